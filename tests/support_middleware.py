"""The middleware routing tests' pools: fixed targets per group without any API (`StaticPools`),
with the usual function Machines for `pdf` and `default` (`routing_manager`); and replays put on
record as the middleware records them (`issued`)."""

from __future__ import annotations

import time

from django.conf import settings
from django.http import HttpResponseBase

from flyfn.machine_role import current_env
from flyfn.pool.choice import ReplayTarget
from flyfn.replay_record import FALLBACK_RETURN_MARGIN, machine_record, replay_key
from tests.support_pools import StaticPools

PDF_MACHINE = "e286de4f711e86"
DEFAULT_MACHINE = "9080e6e9c5d987"
APP_MACHINE = "0e1f2a3b4c5d6e"  # the app Machine function Machines send what is not theirs to


def routing_manager(**more: ReplayTarget) -> StaticPools:
    """The routing tests' targets: a function Machine for `pdf`, one for `default` (and `more`)."""
    return StaticPools(
        {
            "pdf": ReplayTarget(instance=PDF_MACHINE),
            "default": ReplayTarget(instance=DEFAULT_MACHINE),
            **more,
        },
        app_machines=(APP_MACHINE,),
    )


def issued(
    method: str,
    path: str,
    *,
    query: str = "",
    body: str = "",
    ago: float = 0.0,
    timeout: float = 10.0,
    times: int = 1,
) -> None:
    """Put `times` replays of this request on the current Machine's record, as the middleware does
    when it issues one (`body`: the request's `body_binding`), issued `ago` seconds ago with a
    replay timeout of `timeout` seconds."""
    key = replay_key(settings.SECRET_KEY, method, path, query, body)
    record = machine_record(current_env().machine_id)
    for _ in range(times):
        assert record.add(key, timeout + FALLBACK_RETURN_MARGIN, now=time.time() - ago)


def ran_here(response: HttpResponseBase, body: bytes) -> bool:
    """Whether the view ran on this Machine (answered `body`), nothing replayed."""
    return (
        response.status_code == 200 and "fly-replay" not in response and response.content == body  # type: ignore[attr-defined]
    )
