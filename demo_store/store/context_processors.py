"""Template context shared by every store page: the Machine that served it."""

from __future__ import annotations

from django.http import HttpRequest

from store.machine import current_machine


def fly_machine(request: HttpRequest) -> dict[str, str]:
    return {"machine_id": current_machine()}
