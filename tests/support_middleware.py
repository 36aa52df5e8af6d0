"""A pool manager without any API, for tests of the middleware's routing: fixed targets per group
(`FakeManager`), and the routing tests' usual ones (`routing_manager`)."""

from __future__ import annotations

from flyfn.pool import PoolManager, ReplayTarget

PDF_MACHINE = "e286de4f711e86"
DEFAULT_MACHINE = "9080e6e9c5d987"


class FakeManager(PoolManager):
    """Targets per group without any API; records the Machines the middleware forgets."""

    def __init__(self, targets: dict[str, ReplayTarget]) -> None:
        super().__init__()
        self.targets = targets
        self.forgotten: list[tuple[str, str]] = []

    def get_target(self, group: str) -> ReplayTarget | None:
        return self.targets.get(group)

    def wait_target(self, group: str, max_wait: float) -> ReplayTarget | None:
        return self.targets.get(group)

    async def aget_target(self, group: str, max_wait: float) -> ReplayTarget | None:
        return self.targets.get(group)

    def forget(self, group: str, machine_id: str) -> bool:
        self.forgotten.append((group, machine_id))
        return True


def routing_manager(**more: ReplayTarget) -> FakeManager:
    """The routing tests' targets: a function Machine for `pdf`, one for `default` (and `more`)."""
    return FakeManager(
        {
            "pdf": ReplayTarget(instance=PDF_MACHINE),
            "default": ReplayTarget(instance=DEFAULT_MACHINE),
            **more,
        }
    )
