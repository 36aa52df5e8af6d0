"""Which Fly Machine this process runs on ('local' off Fly), for pages and receipt footers."""

from __future__ import annotations

import os


def current_machine() -> str:
    return os.environ.get("FLY_MACHINE_ID") or "local"
