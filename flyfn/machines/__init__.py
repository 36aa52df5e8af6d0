"""flyfn.machines: the typed async Fly Machines API client, its pydantic models and its errors."""

from __future__ import annotations

from flyfn.machines.client import *  # noqa: F403
from flyfn.machines.client import __all__ as _client_all
from flyfn.machines.errors import *  # noqa: F403
from flyfn.machines.errors import __all__ as _errors_all
from flyfn.machines.models import *  # noqa: F403
from flyfn.machines.models import __all__ as _models_all

__all__ = sorted([*_client_all, *_errors_all, *_models_all])
