"""A minimal Django project the benchmarks measure: one plain view and one serverless view."""

from __future__ import annotations
