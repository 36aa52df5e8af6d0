"""Machine pools: which function Machine serves each group, cached, created and converged on demand.

One `MachinePool` per group. The request path only reads the pool's cache (no Machines API call
while it is fresh); every API call runs on one background event loop thread with one
`AsyncMachinesClient`, shared by sync and async requests, and concurrent misses join the one
in-flight convergence (single flight). One module per job:

- `spec`: a group's pool specification from the settings (and which app its Machines live in);
- `choice`: how Machines are chosen (`MachineChoice`, after FLAME's `Pool.Strategy`);
- `converge`: the API work (`converge`, `prepare_group`, `find_orphans`), also `manage.py flyfn`'s;
- `cache`: one group's target cache with single flight and failure backoff;
- `listing`: one list of an app's Machines for all groups and all worker processes of a Machine;
- `loop`: the background event loop thread;
- `manager`: the process's pools (`Pools`, `PoolManager`, `get_manager`).
"""

from __future__ import annotations

from flyfn.pool.cache import FORGET_MIN_INTERVAL, MachinePool
from flyfn.pool.choice import MachineChoice, RankOrder, ReplayTarget
from flyfn.pool.converge import (
    PrepareReport,
    converge,
    destroy_orphans,
    find_orphans,
    is_outdated,
    machine_group,
    machine_image,
    machine_version,
    prepare_group,
)
from flyfn.pool.manager import PoolManager, Pools, get_manager, set_manager
from flyfn.pool.spec import (
    PoolConfigError,
    PoolSpec,
    group_app,
    image_hash,
    name_slug,
    new_client,
    spec_for,
)

__all__ = [
    "FORGET_MIN_INTERVAL",
    "MachineChoice",
    "MachinePool",
    "PoolConfigError",
    "PoolManager",
    "PoolSpec",
    "Pools",
    "PrepareReport",
    "RankOrder",
    "ReplayTarget",
    "converge",
    "destroy_orphans",
    "find_orphans",
    "get_manager",
    "group_app",
    "image_hash",
    "is_outdated",
    "machine_group",
    "machine_image",
    "machine_version",
    "name_slug",
    "new_client",
    "prepare_group",
    "set_manager",
    "spec_for",
]
