"""The local Fly Proxy's decisions, pure (no I/O): which Machine a delivery goes to, and where a
request goes next after a `fly-replay` answer or a failed delivery.

Everything here works on plain data (Machines, a load count, whether a process answers) and
returns plain data or raises `ProxyError` / `Unreachable` / `Full`; `FlyProxy` does the I/O.
The balancing itself (concurrency bands, started first, local first) is `balancer`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from flyfn.emulator.proxy import balancer
from flyfn.emulator.proxy.errors import Full, ProxyError, Unreachable, unbuffered
from flyfn.emulator.roles import is_function_machine
from flyfn.fly.headers import (
    FLY_PREFERRED_INSTANCE_UNAVAILABLE,
    FLY_REPLAY_FAILED,
    FLY_REPLAY_SRC,
)
from flyfn.fly.limits import MAX_REPLAYS, REPLAY_BODY_LIMIT
from flyfn.fly.replay import FlyReplay, ReplayFailed, ReplaySource
from flyfn.machines.models import Machine, MachinePort

__all__ = [
    "DEFAULT_REPLAY_TIMEOUT",
    "MAX_REPLAYS",
    "NOT_STARTABLE",
    "REPLAY_BODY_LIMIT",
    "Delivery",
    "Destination",
    "Directive",
    "Step",
    "check_replayable",
    "check_target",
    "directive_of",
    "fallback_of",
    "https_location",
    "https_redirect",
    "pick",
    "preference_headers",
    "replayed",
    "step_for",
    "unavailable_detail",
]

DEFAULT_REPLAY_TIMEOUT = 30.0
_REPLAY_REQUEST_HEADERS = frozenset({FLY_REPLAY_SRC, FLY_REPLAY_FAILED})
# What Fly Proxy autostarts for a request. A Machine stopping or suspending (perhaps by autostop)
# or failed is in a non-startable state (PM08): no candidate, and a replay to it fails. The
# Machines API's own start endpoint is another matter (`MachinesEmulator.start`).
_STARTABLE = frozenset({"created", "stopped", "suspended"})
NOT_STARTABLE = frozenset({"stopping", "suspending", "failed"})
_TRANSITIONAL = frozenset({"creating", "starting", "restarting", "updating", "replacing"})

# What to do with the Machine `pick` chose: deliver now, wait for it to settle, start it, or
# count it out and pick again.
Step = Literal["deliver", "settle", "start", "skip"]


@dataclass(frozen=True)
class Directive:
    """One fly-replay answer, from the header or the JSON form."""

    instance: str | None = None
    prefer_instance: str | None = None
    app: str | None = None
    regions: tuple[str, ...] = ()
    elsewhere: bool = False
    state: str | None = None
    timeout: float | None = None
    fallback: str | None = None
    transform_path: str | None = None
    set_headers: tuple[tuple[str, str], ...] = ()
    delete_headers: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Destination:
    """Where one delivery of a request may go."""

    app: str
    instance: str | None = None
    prefer_instance: str | None = None
    regions: tuple[str, ...] = ()
    exclude: frozenset[str] = frozenset()
    timeout: float = DEFAULT_REPLAY_TIMEOUT
    fallback: str | None = None
    issuer: Machine | None = None  # the Machine that asked for this replay
    issuer_app: str | None = None
    port: int = 80  # the public port the request came in on (services are matched on it)
    # A client's request that came in over plain http: where `force_https` would send it
    # (`https_location`). Never set on a replay or a fallback: only the edge redirects.
    https_location: str | None = None


@dataclass
class Delivery:
    """What changes between the deliveries of one request."""

    path: bytes
    headers: list[tuple[str, str]]
    extra: dict[str, str] = field(default_factory=dict)
    fallback: bool = False


def check_target(raw_path: bytes) -> None:
    """Only origin-form targets (`/path`) reach a Machine: absolute-form (`http://host/path`),
    asterisk-form (`*`) and targets with a fragment (`#`) get a clean 400, as from Fly Proxy."""
    if not raw_path.startswith(b"/") or b"#" in raw_path:
        shown = raw_path[:100].decode("latin-1")
        raise ProxyError(
            "PU04", 400, f"invalid request target {shown!r}: a path such as /x is needed"
        )


def directive_of(replay: FlyReplay) -> Directive:
    """What the proxy does with a parsed fly-replay answer (PA03 when it makes no sense)."""
    transform = replay.transform or {}
    try:
        set_headers = tuple(
            (str(h["name"]), str(h["value"])) for h in transform.get("set_headers") or ()
        )
        delete_headers = frozenset(
            str(h["name"] if isinstance(h, Mapping) else h).lower()
            for h in transform.get("delete_headers") or ()
        )
    except (KeyError, TypeError) as exc:
        raise ProxyError("PA03", 502, "invalid fly-replay transform") from exc
    path = transform.get("path")
    if path is not None and not (isinstance(path, str) and path.startswith("/")):
        raise ProxyError("PA03", 502, "invalid fly-replay transform path")
    return Directive(
        instance=replay.instance,
        prefer_instance=replay.prefer_instance,
        app=replay.app,
        regions=tuple(r.lower() for r in replay.region),
        elsewhere=replay.elsewhere,
        state=replay.state,
        timeout=replay.timeout_seconds,
        fallback=replay.fallback,
        transform_path=path,
        set_headers=set_headers,
        delete_headers=delete_headers,
    )


def https_location(
    scheme: str, forwarded_port: str | None, host: str | None, path: bytes
) -> str | None:
    """Where `force_https` sends a client's request that came in over plain http on port 80:
    `https://<host><path>` (the host without its port: Fly's HTTPS is on 443); None otherwise.

    The local edge listens on plain http only and stands for both of Fly's public ports (services
    are matched on port 80): a request counts as having come in on plain port 80 only when it says
    so with `Fly-Forwarded-Port: 80` (the header Fly's edge sets), so that local traffic is never
    redirected to an https listener that does not exist."""
    if scheme != "http" or (forwarded_port or "").strip() != "80" or not (host or "").strip():
        return None
    name = (host or "").strip()
    end = name.find("]") + 1 if name.startswith("[") else 0  # an IPv6 literal's end
    name = name[:end] if end else name.partition(":")[0]
    return f"https://{name}{path.decode('latin-1')}"


def https_redirect(machine: Machine, dest: Destination) -> str | None:
    """Fly's `force_https`: the `Location` of the 301 Fly Proxy answers instead of delivering a
    request that came in over plain http (`dest.https_location`) to `machine`, when the Machine's
    service port it came in on says `force_https`; None to deliver it."""
    if dest.https_location is None:
        return None
    entry = _port_entry(machine, dest.port)
    return dest.https_location if entry is not None and entry.force_https else None


def _port_entry(machine: Machine, port: int) -> MachinePort | None:
    """The Machine's `services[].ports[]` entry that publishes `port`, if any."""
    services = (machine.config.services if machine.config is not None else None) or []
    for service in services:
        for entry in service.ports or []:
            start, end = entry.start_port, entry.end_port
            if entry.port == port or (
                start is not None and end is not None and start <= port <= end
            ):
                return entry
    return None


def check_replayable(
    delivery: Delivery,
    *,
    body_complete: bool,
    body_size: int,
    replays: int,
    body_limit: int,
    edge_buffer_limit: int,
) -> None:
    """Refuse the replay Fly Proxy refuses (`replays`: this one included): of a fallback, of a
    body the edge did not keep or over the replay limit, past the chain limit."""
    if delivery.fallback:
        raise ProxyError("PA03", 502, "a fallback request cannot be replayed again")
    if not body_complete:
        raise ProxyError("PA01", 502, unbuffered(edge_buffer_limit, "replayed"))
    if body_size > body_limit:
        raise ProxyError(
            "PA03", 502, f"a request with a body over {body_limit} bytes cannot be replayed"
        )
    if replays > MAX_REPLAYS:
        raise ProxyError("PA02", 502, f"more than {MAX_REPLAYS} replays for one request")


def replayed(
    dest: Destination,
    delivery: Delivery,
    directive: Directive,
    machine: Machine,
    *,
    region: str,
    replay_timeout: float,
    now_us: int,
) -> tuple[Destination, Delivery]:
    """Where the request goes after `machine` answered with `directive`, and as what."""
    src = ReplaySource(
        instance=machine.id,
        region=machine.region or region,
        t=now_us,
        state=directive.state,
    ).to_header()
    drop = directive.delete_headers | _REPLAY_REQUEST_HEADERS
    headers = [(k, v) for k, v in delivery.headers if k.lower() not in drop]
    if directive.set_headers:
        names = {k.lower() for k, _ in directive.set_headers}
        headers = [(k, v) for k, v in headers if k.lower() not in names]
        headers.extend(directive.set_headers)
    path = delivery.path
    if directive.transform_path is not None:
        path = directive.transform_path.encode()
    new_dest = Destination(
        app=directive.app or dest.app,
        instance=directive.instance,
        prefer_instance=directive.prefer_instance,
        regions=directive.regions,
        exclude=frozenset({machine.id}) if directive.elsewhere else frozenset(),
        timeout=directive.timeout if directive.timeout is not None else replay_timeout,
        fallback=directive.fallback,
        issuer=machine,
        issuer_app=dest.app,
        port=dest.port,
    )
    return new_dest, Delivery(path=path, headers=headers, extra={FLY_REPLAY_SRC: src})


def fallback_of(
    dest: Destination,
    delivery: Delivery,
    failure: Unreachable,
    *,
    elapsed: float,
    region: str,
    home_app: str,
    replay_timeout: float,
) -> tuple[Destination, Delivery]:
    """Where a failed delivery goes next (the replay's fallback to its issuer); raises the
    proxy error (PR04 when no Machine could take it, else PC01) when nowhere."""
    issuer = dest.issuer
    if issuer is None or dest.fallback is None or delivery.fallback:
        status = 503 if failure.reason == "no_candidate" else 502
        code = "PR04" if failure.reason == "no_candidate" else "PC01"
        raise ProxyError(code, status, failure.detail)
    app = dest.issuer_app or home_app
    failed = ReplayFailed(
        instance=failure.target,
        app=dest.app,
        region=region,
        replay_source=issuer.id,
        reason=failure.reason,
        elapsed_ms=round(elapsed * 1000),
    ).to_header()
    headers = [(k, v) for k, v in delivery.headers if k.lower() not in _REPLAY_REQUEST_HEADERS]
    if dest.fallback == "force_self":
        new_dest = Destination(app=app, instance=issuer.id, timeout=replay_timeout, port=dest.port)
    else:
        new_dest = Destination(
            app=app, prefer_instance=issuer.id, timeout=replay_timeout, port=dest.port
        )
    return new_dest, Delivery(
        path=delivery.path, headers=headers, extra={FLY_REPLAY_FAILED: failed}, fallback=True
    )


def pick(
    dest: Destination,
    machines: Sequence[Machine],
    *,
    home_app: str,
    region: str,
    load: Callable[[str], int],
    answering: Callable[[str], bool],
    unavailable: set[str],
    balance_function_machines: bool = True,
) -> Machine:
    """The Machine this delivery goes to among the app's `machines` (Fly's balancing,
    `flyfn.emulator.proxy.balancer`); `Full` when every candidate is at its hard limit."""
    if not machines and dest.app != home_app:
        raise ProxyError("PA04", 502, f"replay target app {dest.app!r} not found")
    if dest.instance:
        for machine in machines:
            if machine.id == dest.instance and machine.id not in unavailable:
                # Its hard limit holds for replays to it too: they wait for room, as every
                # request does when all the Machines it may go to are full.
                service = balancer.service_on_port(machine, dest.port)
                if service is not None and balancer.limits_of(service).band(load(machine.id)) == 2:
                    raise Full(f"Machine {machine.id} is at its hard_limit")
                return machine
        raise Unreachable(
            "no_candidate", f"no candidate: Machine {dest.instance} is not available", dest.instance
        )
    pool = [m for m in machines if m.id not in dest.exclude and m.id not in unavailable]
    if not balance_function_machines:
        # Focused unit tests only: ordinary traffic kept off function Machines (an app of
        # only function Machines, the `app` strategy's, is still balanced over them).
        pool = [m for m in pool if not is_function_machine(m)] or pool
    if dest.regions and "any" not in dest.regions:
        pool = [m for m in pool if (m.region or region) in dest.regions]
    by_id = {m.id: m for m in pool}
    candidates = [
        c
        for m in pool
        if (
            c := balancer.candidate(
                m, port=dest.port, load=load(m.id), answering=answering(m.id), region=region
            )
        )
        is not None
    ]
    choice = balancer.choose(candidates, prefer=dest.prefer_instance)
    if choice is not None:
        return by_id[choice.machine_id]
    if candidates:  # every one at its hard limit: the request waits its turn
        raise Full(f"every Machine of app {dest.app!r} is at its hard_limit")
    raise Unreachable(
        "no_candidate", f"no candidate: no Machine of app {dest.app!r} can take it", None
    )


def step_for(machine: Machine, *, answering: bool) -> Step:
    """What to do with the Machine `pick` chose, from its state and whether its process answers."""
    state = machine.state or ""
    if state == "started" and answering:
        return "deliver"
    if state in NOT_STARTABLE:  # PM08: not started for a request
        return "skip"
    if state in _TRANSITIONAL or state == "started":  # started without a process: it may have died
        return "settle"
    if state in _STARTABLE and _autostarts(machine):
        return "start"
    return "skip"


def unavailable_detail(machine: Machine) -> str:
    """Why a replay to `instance=<machine>` that `step_for` skips cannot be delivered."""
    if machine.state in NOT_STARTABLE:
        return (
            f"no candidate: Machine {machine.id} is in a non-startable state "
            f"({machine.state}) (PM08)"
        )
    return f"no candidate: Machine {machine.id} is not available"


def preference_headers(dest: Destination, machine: Machine) -> dict[str, str]:
    """Fly's note to a Machine that got a request preferred for another one."""
    if dest.prefer_instance and machine.id != dest.prefer_instance:
        return {FLY_PREFERRED_INSTANCE_UNAVAILABLE: dest.prefer_instance}
    return {}


def _autostarts(machine: Machine) -> bool:
    services = machine.config.services if machine.config is not None else None
    return not services or any(s.autostart is not False for s in services)
