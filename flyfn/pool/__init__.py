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

Internal: import from the module that owns a name; the package exports nothing (the public
surface is listed in docs/api.md).
"""
