"""flyfn: run chosen Django views as scale-to-zero serverless functions on Fly.io Machines."""

from __future__ import annotations

__all__: list[str] = []
