"""flyfn.tasks' AppConfig: the lease model's app, and what a web process starts as it boots (the
dispatchers and the ticker on app Machines, the keeper on a task group's function Machines)."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core.signals import request_finished, request_started

from flyfn.serving import serving_started


def _start_dispatchers(**kwargs: Any) -> None:
    # An app Machine must wake groups with due work even if it never enqueues anything itself
    # (a wake by another Machine that died, a scheduled task): a web process starts that as it
    # boots (flyfn.serving), or with its first request if its handler has no flyfn middleware.
    from flyfn.tasks.dispatch import start_all
    from flyfn.tasks.periodic import start_ticker

    serving_started.disconnect(dispatch_uid="flyfn.tasks.start_dispatchers")
    request_started.disconnect(dispatch_uid="flyfn.tasks.start_dispatchers")
    start_all()
    start_ticker()  # schedules finer than Fly's intervals (all of them off Fly)


def _keep_from_start(**kwargs: Any) -> None:
    # A task group's function Machine keeps itself from the moment it serves, so that one launched
    # without a request stops once idle too (flyfn.tasks.keeper).
    from flyfn.tasks.keeper import on_serving

    on_serving()


def _keep_up(**kwargs: Any) -> None:
    # A task group's function Machine stays up while requests come and its group has work, then
    # stops itself (flyfn.tasks.keeper); on every other Machine this receiver is let go.
    from flyfn.machine_role import current_role
    from flyfn.tasks.keeper import on_request

    if not current_role().is_function:
        request_started.disconnect(dispatch_uid="flyfn.tasks.keep_up")
        request_finished.disconnect(dispatch_uid="flyfn.tasks.keep_up_done")
        return
    on_request()


def _keep_up_done(**kwargs: Any) -> None:
    # The request `_keep_up` counted is over: the keeper counts a Machine's requests in flight
    # across its worker processes (flyfn.tasks.activity).
    from flyfn.tasks.keeper import on_request_finished

    on_request_finished()


class FlyfnTasksConfig(AppConfig):
    """`"flyfn.tasks"` in INSTALLED_APPS."""

    name = "flyfn.tasks"
    label = "flyfn_tasks"
    verbose_name = "flyfn tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        serving_started.connect(_start_dispatchers, dispatch_uid="flyfn.tasks.start_dispatchers")
        request_started.connect(_start_dispatchers, dispatch_uid="flyfn.tasks.start_dispatchers")
        request_started.connect(_keep_up, dispatch_uid="flyfn.tasks.keep_up")
        request_finished.connect(_keep_up_done, dispatch_uid="flyfn.tasks.keep_up_done")
        serving_started.connect(_keep_from_start, dispatch_uid="flyfn.tasks.keep_from_start")
