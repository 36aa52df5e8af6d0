"""flyfn's events: one vocabulary of structured log records, mirrored as Prometheus metrics.

Every event is logged by `flyfn.events.<kind>` with `extra` fields named `flyfn_*` (so a
JSON log formatter picks them up), and, when metrics are on (`flyfn.metrics.enable`), counted
in the metric documented beside it. Per-request events log at DEBUG, so nothing is logged per
request at INFO; changes to Machines log at INFO; failures that need an operator log at WARNING.

No event carries a secret: only group names, Machine ids, API operations, statuses, reasons and
durations. This module is Django-free; the middleware, the pool (also for the API client, as its
`on_api_call`) and the tasks backend call it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

from flyfn import metrics

if TYPE_CHECKING:
    from flyfn.machines.client import ApiOutcome

__all__ = [
    "BounceReason",
    "FailoverReason",
    "FallbackOutcome",
    "FallbackReason",
    "PoolAction",
    "TaskOutcome",
    "api_called",
    "bounced",
    "cold_waited",
    "failed_over",
    "fell_back",
    "pool_changed",
    "replayed",
    "state_rejected",
    "task_changed",
]

FallbackReason = Literal[
    "replay_failed",  # Fly Proxy answered with fly-replay-failed: the replay was not delivered
    "body",  # a body Fly Proxy cannot replay (over the limit, or chunked)
    "no_machine",  # no function Machine to replay to in time (API down or slow, settings)
    "header",  # the replay header could not be built (a Machine id it cannot carry)
    "untrusted_failure",  # a fly-replay-failed no replay this Machine issued explains (any more)
    "unsigned",  # a function Machine's own view, not replayed, that cannot be sent on
]
FallbackOutcome = Literal["local", "unavailable"]
BounceReason = Literal[
    "not_serverless",  # an ordinary request landed on a function Machine
    "other_group",  # another group's serverless view landed on a function Machine
    "unsigned",  # a request for this group's view that no app Machine replayed
]
PoolAction = Literal["create", "update", "destroy"]
FailoverReason = Literal[
    "not_listed",  # the caller's region is not in the group's `regions`: the nearest listed one
    "no_capacity",  # Fly had no capacity for a Machine in the home region
    "refused",  # the API refused to create a Machine there for a reason of the region (409/412/422)
    "unavailable",  # the API failed (5xx, unreachable): only Machines known elsewhere take them
    "recovered",  # back in the home region after a failover
]
TaskOutcome = Literal["enqueued", "started", "succeeded", "failed", "retried"]

_replay_log = logging.getLogger("flyfn.events.replay")
_fallback_log = logging.getLogger("flyfn.events.fallback")
_bounce_log = logging.getLogger("flyfn.events.bounce")
_state_log = logging.getLogger("flyfn.events.state")
_cold_log = logging.getLogger("flyfn.events.cold_wait")
_pool_log = logging.getLogger("flyfn.events.pool")
_api_log = logging.getLogger("flyfn.events.api")
_task_log = logging.getLogger("flyfn.events.task")
_region_log = logging.getLogger("flyfn.events.region")


def replayed(group: str, machine_id: str | None, app: str | None) -> None:
    """A request was answered with `fly-replay` to a function Machine (`instance`) or to the
    function app (`app` strategy). DEBUG; `flyfn_replays_total{group}`."""
    if _replay_log.isEnabledFor(logging.DEBUG):
        target = machine_id or app or "?"
        _replay_log.debug(
            "flyfn: replay to %s (group %r)",
            target,
            group,
            extra={"flyfn_event": "replay", "flyfn_group": group, "flyfn_machine": machine_id,
                   "flyfn_app": app},
        )  # fmt: skip
    recorded = metrics.recorded()
    if recorded is not None:
        recorded.replays.labels(group).inc()


def fell_back(group: str, reason: FallbackReason, outcome: FallbackOutcome) -> None:
    """A serverless request did not go to a function Machine: it ran here (`local`) or was
    answered 503 (`unavailable`). DEBUG; `flyfn_fallbacks_total{group,reason,outcome}`."""
    if _fallback_log.isEnabledFor(logging.DEBUG):
        _fallback_log.debug(
            "flyfn: fallback (%s) for group %r: %s",
            outcome,
            group,
            reason,
            extra={"flyfn_event": "fallback", "flyfn_group": group, "flyfn_reason": reason,
                   "flyfn_outcome": outcome},
        )  # fmt: skip
    recorded = metrics.recorded()
    if recorded is not None:
        recorded.fallbacks.labels(group, reason, outcome).inc()


def bounced(group: str, reason: BounceReason) -> None:
    """A function Machine of `group` sent a request back with `elsewhere=true`.
    DEBUG; `flyfn_bounces_total{group,reason}`."""
    if _bounce_log.isEnabledFor(logging.DEBUG):
        _bounce_log.debug(
            "flyfn: bounced elsewhere from group %r: %s",
            group,
            reason,
            extra={"flyfn_event": "bounce", "flyfn_group": group, "flyfn_reason": reason},
        )
    recorded = metrics.recorded()
    if recorded is not None:
        recorded.bounces.labels(group, reason).inc()


def state_rejected(group: str, reason: str) -> None:
    """A function Machine could not verify a replay's signed state (`reason` as
    `verify_state` gives it: `signature mismatch`, `state expired`, ...). DEBUG (a client
    can send these at will);
    `flyfn_rejected_states_total{group,reason}`."""
    if _state_log.isEnabledFor(logging.DEBUG):
        _state_log.debug(
            "flyfn: replay state rejected (group %r): %s",
            group,
            reason,
            extra={"flyfn_event": "state_rejected", "flyfn_group": group, "flyfn_reason": reason},
        )
    recorded = metrics.recorded()
    if recorded is not None:
        recorded.rejected_states.labels(group, reason).inc()


def cold_waited(group: str, seconds: float, found: bool) -> None:
    """A request waited for a group with no known Machine (cold pool) `seconds`; `found`
    says whether a target came. DEBUG; `flyfn_cold_wait_seconds{group,found}`."""
    if _cold_log.isEnabledFor(logging.DEBUG):
        _cold_log.debug(
            "flyfn: waited %.3fs for a Machine of group %r (%s)",
            seconds,
            group,
            "found" if found else "none",
            extra={"flyfn_event": "cold_wait", "flyfn_group": group, "flyfn_seconds": seconds,
                   "flyfn_found": found},
        )  # fmt: skip
    recorded = metrics.recorded()
    if recorded is not None:
        recorded.cold_waits.labels(group, "true" if found else "false").observe(seconds)


def pool_changed(
    group: str, action: PoolAction, machine_id: str, region: str | None = None
) -> None:
    """flyfn created, updated or destroyed a function Machine of `group` (of its pool in
    `region`, when the group has one per region). INFO;
    `flyfn_pool_changes_total{group,action,region}` (region "" for a group's one shared pool)."""
    _pool_log.info(
        "flyfn: %s Machine %s (group %r%s)",
        action,
        machine_id,
        group,
        f", region {region}" if region else "",
        extra={"flyfn_event": "pool", "flyfn_group": group, "flyfn_action": action,
               "flyfn_machine": machine_id, "flyfn_region": region},
    )  # fmt: skip
    recorded = metrics.recorded()
    if recorded is not None:
        recorded.pool_changes.labels(group, action, region or "").inc()


def failed_over(group: str, home: str | None, region: str | None, reason: FailoverReason) -> None:
    """A multi-region group's requests from this Machine go to another region's Machines than
    their home region's (`regions`), or back home (`recovered`); once per change, not per
    request. WARNING when home has no Machine to be had (an operator may want to know), else
    INFO; `flyfn_region_failovers_total{group,home,region,reason}`."""
    level = logging.INFO if reason in ("not_listed", "recovered") else logging.WARNING
    _region_log.log(
        level,
        "flyfn: group %r requests from home region %s go to region %s (%s)",
        group,
        home or "-",
        region or "-",
        reason,
        extra={"flyfn_event": "failover", "flyfn_group": group, "flyfn_home": home,
               "flyfn_region": region, "flyfn_reason": reason},
    )  # fmt: skip
    recorded = metrics.recorded()
    if recorded is not None:
        recorded.region_failovers.labels(group, home or "", region or "", reason).inc()


def api_called(operation: str, outcome: ApiOutcome, seconds: float) -> None:
    """One Machines API request (each retry is one): its operation (`create_machine`, ...),
    HTTP status or `timeout`/`connection`, and duration. DEBUG;
    `flyfn_api_calls_total{operation,status}`, `flyfn_api_call_seconds{operation}`."""
    status = str(outcome)
    if _api_log.isEnabledFor(logging.DEBUG):
        _api_log.debug(
            "flyfn: Machines API %s -> %s (%.0f ms)",
            operation,
            status,
            seconds * 1000,
            extra={"flyfn_event": "api_call", "flyfn_operation": operation,
                   "flyfn_status": status, "flyfn_seconds": seconds},
        )  # fmt: skip
    recorded = metrics.recorded()
    if recorded is not None:
        recorded.api_calls.labels(operation, status).inc()
        recorded.api_seconds.labels(operation).observe(seconds)


def task_changed(group: str, outcome: TaskOutcome, task_id: str, task_name: str) -> None:
    """A background task was enqueued, started, succeeded, failed for good, or will run again
    (`retried`: its lease expired or it raised with attempts left). DEBUG, WARNING when
    `failed`; `flyfn_tasks_total{group,outcome}`."""
    level = logging.WARNING if outcome == "failed" else logging.DEBUG
    if _task_log.isEnabledFor(level):
        _task_log.log(
            level,
            "flyfn: task %s (%s) %s (group %r)",
            task_id,
            task_name,
            outcome,
            group,
            extra={"flyfn_event": "task", "flyfn_group": group, "flyfn_outcome": outcome,
                   "flyfn_task": task_id, "flyfn_task_name": task_name},
        )  # fmt: skip
    recorded = metrics.recorded()
    if recorded is not None:
        recorded.tasks.labels(group, outcome).inc()
