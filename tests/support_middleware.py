"""The middleware routing tests' pools: fixed targets per group without any API (`StaticPools`),
with the usual function Machines for `pdf` and `default` (`routing_manager`)."""

from __future__ import annotations

from flyfn.pool import ReplayTarget
from tests.conftest import StaticPools

PDF_MACHINE = "e286de4f711e86"
DEFAULT_MACHINE = "9080e6e9c5d987"


def routing_manager(**more: ReplayTarget) -> StaticPools:
    """The routing tests' targets: a function Machine for `pdf`, one for `default` (and `more`)."""
    return StaticPools(
        {
            "pdf": ReplayTarget(instance=PDF_MACHINE),
            "default": ReplayTarget(instance=DEFAULT_MACHINE),
            **more,
        }
    )
