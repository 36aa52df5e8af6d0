"""Which Fly Machine this process runs on ('local' off Fly), for pages and receipt footers."""

from __future__ import annotations

from flyfn.machine_role import current_env


def current_machine() -> str:
    return current_env().machine_id or "local"
