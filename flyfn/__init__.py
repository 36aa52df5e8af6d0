"""flyfn: run chosen Django views as scale-to-zero serverless functions on Fly.io Machines."""

from __future__ import annotations

from flyfn.decorators import fly_serverless

__all__ = ["__version__", "fly_serverless"]

__version__ = "0.1.0.dev0"
