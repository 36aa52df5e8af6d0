"""flyfn: run chosen Django views as scale-to-zero serverless functions on Fly.io Machines."""

from __future__ import annotations

from flyfn.decorators import fly_serverless

__all__ = ["fly_serverless"]
