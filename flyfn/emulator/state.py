"""The emulated Machines' state: `MachinesEmulator` (state machine, leases, waiters, events) and the
`MachineRuntime` seam through which Machines are made to run (state only by default).

Everything here is in-process and protocol-free: `flyfn.emulator.api` serves it over HTTP, and the
local Fly stack (supervisor, proxy) uses the same object directly. Transitions behave like Fly's:
create/start/stop/suspend/destroy answer at once and the Machine moves through its transitional
state (`starting`, `stopping`, ...) in a background task that awaits the runtime; `wait_for_state`
blocks until the state is reached. Errors are `EmulatorError` with the HTTP status and `error` text
the real API would answer.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import hashlib
import hmac
import itertools
import secrets
import time
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from flyfn.fly.durations import parse_go_duration
from flyfn.fly.limits import MAX_WAIT_TIMEOUT
from flyfn.machines.models import (
    CreateMachineRequest,
    ImageRef,
    Lease,
    Machine,
    MachineConfig,
    MachineEvent,
    StartMachineResponse,
    StrippedLease,
    UpdateMachineRequest,
    WaitMachineResponse,
)

__all__ = [
    "DEFAULT_LEASE_TTL",
    "DEFAULT_STOP_SIGNAL",
    "DEFAULT_STOP_TIMEOUT",
    "MAX_STOP_TIMEOUT",
    "SETTLED_STATES",
    "WAITABLE_STATES",
    "AppSecret",
    "EmulatorError",
    "MachineRuntime",
    "MachinesEmulator",
    "StateOnlyRuntime",
    "new_machine_id",
    "new_ulid",
    "stop_params",
]

DEFAULT_LEASE_TTL = 30
# Fly's defaults when the config has no stop_config (kill_signal SIGINT, kill_timeout 5s).
DEFAULT_STOP_SIGNAL = "SIGINT"
DEFAULT_STOP_TIMEOUT = 5.0
# Fly kills a Machine at most this long after its stop signal, whatever stop_config.timeout says.
MAX_STOP_TIMEOUT = 300.0
# Fly restarts a Machine whose process exits non-zero ("on-failure") this many times by default.
DEFAULT_MAX_RESTARTS = 10
_MAX_EVENTS = 50
LEASE_OWNER = "emulator@flyfn.local"

SETTLED_STATES: frozenset[str] = frozenset(
    {"created", "started", "stopped", "suspended", "destroyed", "failed"}
)
WAITABLE_STATES: frozenset[str] = frozenset(
    {"started", "stopped", "suspended", "destroyed", "failed", "settled"}
)
# A start during stopping/suspending is queued behind it (the later request wins).
_STARTABLE = frozenset({"created", "stopped", "suspended", "failed", "stopping", "suspending"})
_SUSPENDED = frozenset({"suspended", "suspending"})
_STOPPABLE = frozenset({"starting", "started", "suspending", "suspended", "updating"})
_DESTROYABLE_UNFORCED = frozenset({"created", "stopped", "suspended", "failed"})
_GONE = frozenset({"destroying", "destroyed"})


class EmulatorError(Exception):
    """A refusal with the HTTP status and JSON `error` (and optional `status`) Fly would answer."""

    def __init__(self, status: int, error: str, *, error_status: str | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.error_status = error_status

    def body(self) -> dict[str, str]:
        """The JSON error body (ErrorResponse)."""
        out = {"error": self.error}
        if self.error_status is not None:
            out["status"] = self.error_status
        return out


@dataclass
class AppSecret:
    """One app secret as the emulator keeps it; the value never shows in a repr."""

    name: str
    value: str = field(repr=False)
    created_at: float
    updated_at: float

    @property
    def digest(self) -> str:
        # Like flyctl's `secrets list`: a short digest tells values apart without showing them.
        return hashlib.sha256(self.value.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, str]:
        """The API's AppSecret, without its value (the emulator never answers values)."""
        return {
            "name": self.name,
            "digest": self.digest,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


class MachineRuntime(Protocol):
    """Makes emulated Machines run. Each call gets the Machine as it is at that moment."""

    async def launch(self, app: str, machine: Machine) -> None:
        """Make it run; return when it is ready, raise on failure."""

    async def stop(self, app: str, machine: Machine, signal: str, timeout: float) -> None:  # noqa: ASYNC109
        """Stop it: `signal`, then a hard kill after `timeout` seconds."""

    async def suspend(self, app: str, machine: Machine) -> None:
        """Freeze it (resume must be quick)."""

    async def resume(self, app: str, machine: Machine) -> None:
        """Thaw a suspended Machine; return when it is ready, raise on failure."""

    async def destroy(self, app: str, machine: Machine) -> None:
        """Release everything it holds (it may still be running when forced)."""


class StateOnlyRuntime:
    """The default runtime: Machines are state only, every transition succeeds at once."""

    async def launch(self, app: str, machine: Machine) -> None:
        return None

    async def stop(self, app: str, machine: Machine, signal: str, timeout: float) -> None:  # noqa: ASYNC109
        return None

    async def suspend(self, app: str, machine: Machine) -> None:
        return None

    async def resume(self, app: str, machine: Machine) -> None:
        return None

    async def destroy(self, app: str, machine: Machine) -> None:
        return None


# -- identifiers and small parsers ---------------------------------------------------------------

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_ulid(now: float | None = None) -> str:
    """A 26-character ULID (48-bit ms time + 80 random bits, Crockford base32): Fly's versions."""
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (ms << 80) | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_machine_id() -> str:
    """14 lowercase hex digits, like Fly's Machine ids."""
    return secrets.token_hex(7)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_ref_for(image: str) -> ImageRef:
    """Split `registry/repository:tag@digest` like Docker does; a stable fake digest if none."""
    rest, _, digest = image.partition("@")
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
    else:
        registry, path = "docker.io", rest
        if "/" not in path:
            path = f"library/{path}"
    repository, colon, tag = path.rpartition(":")
    if not colon:
        repository, tag = path, "latest"
    if not digest:
        digest = "sha256:" + hashlib.sha256(image.encode()).hexdigest()
    return ImageRef(registry=registry, repository=repository, tag=tag, digest=digest)


_ADJECTIVES = ("quiet", "bold", "misty", "sparkling", "ancient", "young", "divine", "floral")
_NOUNS = ("sun", "river", "meadow", "snow", "forest", "cloud", "wave", "pine")


def _generated_name(taken: Collection[str]) -> str:
    while True:
        name = (
            f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}-{secrets.randbelow(10000):04d}"
        )
        if name not in taken:
            return name


# -- records -------------------------------------------------------------------------------------


@dataclass
class _Lease:
    nonce: str
    expires_at: float
    owner: str
    description: str | None
    version: str

    def to_model(self) -> Lease:
        return Lease(
            nonce=self.nonce,
            expires_at=int(self.expires_at),
            owner=self.owner,
            description=self.description,
            version=self.version,
        )


@dataclass
class _Record:
    """One Machine as the emulator keeps it (the API's `Machine` is built from it on demand)."""

    app: str
    id: str
    name: str
    region: str
    config: MachineConfig
    version: str
    private_ip: str
    created_at: float
    updated_at: float
    seq: int  # creation order: the list order and the pagination cursor
    state: str = "created"
    versions: list[str] = field(default_factory=list)
    events: list[MachineEvent] = field(default_factory=list)
    lease: _Lease | None = None
    restarts: int = 0
    skip_secrets: bool = False  # created with `skip_secrets`: booted without the app's secrets
    # Bumped by every requested transition: a background task whose op is no longer the latest
    # one must not overwrite the state a later request asked for.
    op: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def live(self) -> bool:
        return self.state not in _GONE


# -- the emulator --------------------------------------------------------------------------------


class MachinesEmulator:
    """In-memory Fly Machines of every app, with Fly's states, leases, waits and events.

    Apps need no declaring: any app name holds its own set of Machines (names unique among the
    live ones). `default_app` is the app tools built on the emulator use when none is named.
    """

    def __init__(
        self,
        *,
        runtime: MachineRuntime | None = None,
        region: str = "local",
        default_app: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.runtime: MachineRuntime = runtime if runtime is not None else StateOnlyRuntime()
        self.region = region
        self.default_app = default_app
        # Regions where creating a Machine fails as Fly answers when it has no capacity there
        # (412 `insufficient_capacity`): what a multi-region app's failover is tested against.
        self.full_regions: set[str] = set()
        self._clock = clock
        self.clock = clock  # the wall clock of its events' timestamps (autostop reads them)
        self._apps: dict[str, dict[str, _Record]] = {}
        self._seq = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._secrets: dict[str, dict[str, AppSecret]] = {}
        self._secrets_version: dict[str, int] = {}

    def __repr__(self) -> str:
        count = sum(len(machines) for machines in self._apps.values())
        return f"MachinesEmulator(region={self.region!r}, machines={count})"

    # -- queries ---------------------------------------------------------------------------------

    def app_names(self) -> builtins.list[str]:
        """The apps that have (or had) Machines, sorted."""
        return sorted(self._apps)

    def get(self, app: str, machine_id: str, *, include_lease: bool = False) -> Machine:
        """The Machine (also when destroyed); EmulatorError 404 when it never existed."""
        return self._to_machine(self._record(app, machine_id), include_lease=include_lease)

    def list(
        self,
        app: str,
        *,
        include_deleted: bool = False,
        region: str | None = None,
        states: Collection[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        summary: bool = False,
        include_leases: bool = False,
    ) -> builtins.list[Machine]:
        """The app's Machines in creation order, filtered like `GET /v1/apps/{app}/machines`."""
        out = []
        for rec in sorted(self._apps.get(app, {}).values(), key=lambda r: r.seq):
            if not include_deleted and not rec.live:
                continue
            if region is not None and rec.region != region:
                continue
            if states and rec.state not in states:
                continue
            if metadata:
                have = rec.config.metadata or {}
                if any(have.get(key) != value for key, value in metadata.items()):
                    continue
            out.append(self._to_machine(rec, include_lease=include_leases, summary=summary))
        return out

    def list_page(
        self, app: str, *, limit: int, cursor: str | None = None, **filters: Any
    ) -> tuple[builtins.list[Machine], str | None]:
        """One page of `list` after `cursor`, and the cursor of the next page (None at the end)."""
        after = _decode_cursor(cursor) if cursor else 0
        machines = self.list(app, **filters)
        seqs = {rec.id: rec.seq for rec in self._apps.get(app, {}).values()}
        rest = [m for m in machines if seqs[m.id] > after]
        page = rest[:limit]
        next_cursor = _encode_cursor(seqs[page[-1].id]) if len(rest) > limit else None
        return page, next_cursor

    def events(self, app: str, machine_id: str) -> builtins.list[MachineEvent]:
        """The Machine's events, newest first."""
        return list(self._record(app, machine_id).events)

    def get_metadata(self, app: str, machine_id: str) -> dict[str, str]:
        return dict(self._record(app, machine_id).config.metadata or {})

    def get_lease(self, app: str, machine_id: str) -> Lease:
        lease = self._active_lease(self._record(app, machine_id))
        if lease is None:
            raise EmulatorError(404, "lease not found")
        return lease.to_model()

    # -- lifecycle -------------------------------------------------------------------------------

    async def create(self, app: str, request: CreateMachineRequest) -> Machine:
        """Create a Machine (state `created`); unless `skip_launch`, start it in the background."""
        _require_image(request.config)
        region = request.region or self.region
        if region in self.full_regions:
            raise EmulatorError(
                412,
                f"could not reserve resource for machine in {region}: insufficient memory "
                "available to fulfill request",
                error_status="insufficient_capacity",
            )
        machines = self._apps.setdefault(app, {})
        live_names = {rec.name for rec in machines.values() if rec.live}
        if request.name:
            if request.name in live_names:
                holder = next(r for r in machines.values() if r.live and r.name == request.name)
                raise EmulatorError(
                    409,
                    f"unique machine name violation, machine ID {holder.id} already exists "
                    f'with name "{request.name}"',
                    error_status="name_taken",
                )
            name = request.name
        else:
            name = _generated_name(live_names)
        machine_id = new_machine_id()
        while machine_id in machines:
            machine_id = new_machine_id()
        now = self._clock()
        version = new_ulid(now)
        rec = _Record(
            app=app,
            id=machine_id,
            name=name,
            region=region,
            config=request.config.model_copy(deep=True),
            version=version,
            versions=[version],
            private_ip=_private_ip(),
            created_at=now,
            updated_at=now,
            seq=next(self._seq),
            skip_secrets=bool(request.skip_secrets),
        )
        machines[machine_id] = rec
        self._event(rec, "launch", "created", source="user")
        nonce = None
        if request.lease_ttl:
            nonce = self._new_lease(rec, request.lease_ttl, None).nonce
        machine = self._to_machine(rec)
        machine.nonce = nonce
        if not request.skip_launch:
            self._begin_start(rec)
        return machine

    async def update(
        self,
        app: str,
        machine_id: str,
        request: UpdateMachineRequest,
        *,
        lease_nonce: str | None = None,
    ) -> Machine:
        """Replace the config (new version); restart a running Machine, start a stopped one
        unless `skip_launch`. A suspended Machine's snapshot is of the old config: it is booted
        afresh (restarted), or with `skip_launch` stopped, to boot cold at its next start."""
        rec = self._live_record(app, machine_id)
        self._check_lease(rec, lease_nonce)
        if request.current_version and request.current_version != rec.version:
            raise EmulatorError(
                409,
                f"machine {rec.id} version {rec.version} does not match current_version "
                f"{request.current_version}",
            )
        _require_image(request.config)
        if request.name and request.name != rec.name:
            if any(r.live and r.name == request.name for r in self._apps[app].values()):
                raise EmulatorError(
                    409,
                    f'machine name "{request.name}" is already taken',
                    error_status="name_taken",
                )
            rec.name = request.name
        previous = rec.state
        rec.config = request.config.model_copy(deep=True)
        rec.version = new_ulid(self._clock())
        rec.versions.append(rec.version)
        rec.restarts = 0
        self._event(rec, "update", previous, source="user")
        if previous in ("started", "starting") or (
            previous in _SUSPENDED and not request.skip_launch
        ):
            self._begin_restart(rec)
        elif previous in _SUSPENDED:
            signal, timeout = self._stop_params(rec)
            self._set_state(rec, "stopping", "stop", source="user")
            self._spawn(self._run_stop(rec, self._next_op(rec), signal, timeout))
        elif previous in _STARTABLE and not request.skip_launch:
            self._begin_start(rec)
        else:
            self._touch(rec)
        return self._to_machine(rec)

    async def start(self, app: str, machine_id: str) -> StartMachineResponse:
        """Start (or resume) the Machine; a started or starting one is left as it is."""
        rec = self._live_record(app, machine_id)
        previous = rec.state
        if previous not in ("started", "starting"):
            if previous not in _STARTABLE:
                raise EmulatorError(
                    412, f"unable to start machine from current state: '{previous}'"
                )
            rec.restarts = 0
            self._begin_start(rec)
        return StartMachineResponse(previous_state=previous, migrated=False, new_host="")

    async def stop(
        self,
        app: str,
        machine_id: str,
        *,
        signal: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (the kill grace period)
    ) -> None:
        """Stop the Machine (configured or given signal, hard kill after the timeout: its
        `stop_config`'s by default, SIGINT and 5 s without one, at most 300 s)."""
        rec = self._live_record(app, machine_id)
        if rec.state not in _STOPPABLE:
            return  # already stopped, stopping or never started: nothing to do, like Fly
        configured_signal, configured_timeout = self._stop_params(rec)
        signal = signal or configured_signal
        timeout = configured_timeout if timeout is None else min(timeout, MAX_STOP_TIMEOUT)
        self._set_state(rec, "stopping", "stop", source="user")
        op = self._next_op(rec)
        self._spawn(self._run_stop(rec, op, signal, timeout))

    async def suspend(self, app: str, machine_id: str) -> None:
        """Suspend a started Machine."""
        rec = self._live_record(app, machine_id)
        if rec.state in ("suspended", "suspending"):
            return
        if rec.state != "started":
            raise EmulatorError(412, f"unable to suspend machine from current state: '{rec.state}'")
        self._set_state(rec, "suspending", "suspend", source="user")
        op = self._next_op(rec)
        self._spawn(self._run_suspend(rec, op))

    async def destroy(self, app: str, machine_id: str, *, force: bool = False) -> None:
        """Destroy the Machine; a running one only with `force` (else 412, like Fly)."""
        rec = self._live_record(app, machine_id)
        if not force and rec.state not in _DESTROYABLE_UNFORCED:
            raise EmulatorError(
                412,
                f"failed_precondition: unable to destroy machine, not currently stopped "
                f"or suspended (state: '{rec.state}'); use force=true",
            )
        self._begin_destroy(rec, source="user")

    async def wait_for_state(
        self,
        app: str,
        machine_id: str,
        state: str = "started",
        timeout: float = MAX_WAIT_TIMEOUT,  # noqa: ASYNC109 (answered as 408, like Fly)
        *,
        version: str | None = None,
    ) -> Machine:
        """Block until the Machine is in `state` (or any settled state for `"settled"`);
        EmulatorError 408 after `timeout` seconds."""
        if state not in WAITABLE_STATES:
            raise EmulatorError(
                400,
                f"invalid state {state!r}: must be one of " + ", ".join(sorted(WAITABLE_STATES)),
            )
        rec = self._record(app, machine_id)
        if version is not None and version not in rec.versions:
            raise EmulatorError(400, f"machine {rec.id} has no version {version!r}")
        targets = SETTLED_STATES if state == "settled" else frozenset({state})
        await self._wait_until(rec, targets, timeout, f"timeout waiting for machine to be {state}")
        return self._to_machine(rec)

    def wait_response(self, app: str, machine_id: str) -> WaitMachineResponse:
        """The `wait` endpoint's answer for the Machine as it is now."""
        rec = self._record(app, machine_id)
        event_id = rec.events[0].id if rec.events else None
        return WaitMachineResponse(ok=True, state=rec.state, version=rec.version, event_id=event_id)

    async def start_and_wait(
        self,
        app: str,
        machine_id: str,
        timeout: float = MAX_WAIT_TIMEOUT,  # noqa: ASYNC109 (raised as a 408 EmulatorError)
    ) -> Machine:
        """Start the Machine and return it once started (what the proxy's autostart needs);
        EmulatorError 412 when it fails to start, 408 on timeout."""
        await self.start(app, machine_id)
        rec = self._record(app, machine_id)
        await self._wait_until(
            rec, SETTLED_STATES - {"created"}, timeout, "timeout waiting for machine to be started"
        )
        if rec.state != "started":
            raise EmulatorError(412, f"machine {rec.id} failed to start (state: '{rec.state}')")
        return self._to_machine(rec)

    async def machine_exited(self, app: str, machine_id: str, *, exit_code: int | None) -> None:
        """The runtime reports the process of a started Machine died on its own: record an exit
        event and restart it per its restart policy, or leave it stopped (auto_destroy honoured)."""
        rec = self._apps.get(app, {}).get(machine_id)
        if rec is None or rec.state != "started":
            return  # exits the emulator asked for (stop, suspend, destroy, restart) are expected
        restart = self._should_restart(rec, exit_code)
        self._set_state(
            rec,
            "starting" if restart else "stopped",
            "exit",
            source="flyd",
            request={
                "exit_event": {
                    "exit_code": exit_code,
                    "requested_stop": False,
                    "restarting": restart,
                    "exited_at": _iso(self._clock()),
                }
            },
        )
        if restart:
            rec.restarts += 1
            self._spawn(self._run_start(rec, self._next_op(rec), resume=False))
        elif rec.config.auto_destroy:
            self._begin_destroy(rec, source="flyd")

    # -- app secrets ------------------------------------------------------------------------------

    def set_secrets(self, app: str, values: Mapping[str, str | None]) -> int:
        """Set (or, for None, unset) the app's secrets at once; the new secrets version. Like
        Fly's API this restarts nothing: Machines get the values at their next start or update."""
        secrets_of = self._secrets.setdefault(app, {})
        now = self._clock()
        for name, value in values.items():
            if value is None:
                secrets_of.pop(name, None)
            elif name in secrets_of:
                secrets_of[name].value = value
                secrets_of[name].updated_at = now
            else:
                secrets_of[name] = AppSecret(name, value, now, now)
        self._secrets_version[app] = self._secrets_version.get(app, 0) + 1
        return self._secrets_version[app]

    def secrets(self, app: str) -> builtins.list[AppSecret]:
        """The app's secrets by name."""
        return sorted(self._secrets.get(app, {}).values(), key=lambda s: s.name)

    def secret(self, app: str, name: str) -> AppSecret:
        found = self._secrets.get(app, {}).get(name)
        if found is None:
            raise EmulatorError(404, f"secret {name!r} not found")
        return found

    def secrets_version(self, app: str) -> int:
        return self._secrets_version.get(app, 0)

    def secret_env(self, app: str, machine_id: str) -> dict[str, str]:
        """The environment a Machine boots with from the app's secrets, as they are now (none
        for a Machine created with `skip_secrets`)."""
        rec = self._apps.get(app, {}).get(machine_id)
        if rec is not None and rec.skip_secrets:
            return {}
        return {name: secret.value for name, secret in self._secrets.get(app, {}).items()}

    # -- metadata and leases ---------------------------------------------------------------------

    async def set_metadata(self, app: str, machine_id: str, key: str, value: str) -> None:
        rec = self._live_record(app, machine_id)
        rec.config.metadata = {**(rec.config.metadata or {}), key: value}
        self._touch(rec)

    async def delete_metadata(self, app: str, machine_id: str, key: str) -> None:
        rec = self._live_record(app, machine_id)
        metadata = dict(rec.config.metadata or {})
        metadata.pop(key, None)
        rec.config.metadata = metadata
        self._touch(rec)

    async def acquire_lease(
        self,
        app: str,
        machine_id: str,
        *,
        ttl: int | None,
        description: str | None = None,
        nonce: str | None = None,
    ) -> Lease:
        """A new lease (409 while another is held); with the holder's `nonce`, a refresh."""
        rec = self._live_record(app, machine_id)
        ttl = DEFAULT_LEASE_TTL if ttl is None else ttl
        if ttl <= 0:
            raise EmulatorError(400, "invalid lease ttl: must be a positive number of seconds")
        current = self._active_lease(rec)
        if current is not None:
            if nonce is None or not _same(nonce, current.nonce):
                raise EmulatorError(409, self._held_message(rec, current))
            current.expires_at = self._clock() + ttl
            if description is not None:
                current.description = description
            return current.to_model()
        return self._new_lease(rec, ttl, description).to_model()

    async def release_lease(self, app: str, machine_id: str, *, nonce: str) -> None:
        """Release the lease held with `nonce` (409 when another holds it; none held is fine)."""
        rec = self._live_record(app, machine_id)
        current = self._active_lease(rec)
        if current is None:
            return
        if not _same(nonce, current.nonce):
            raise EmulatorError(409, self._held_message(rec, current))
        rec.lease = None

    # -- shutdown --------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Cancel the transitions still running (their runtime calls are abandoned)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def settle(self) -> None:
        """Wait until no transition is running (for tests and orderly shutdown)."""
        # Only the pending ones: on Python >= 3.12 gather() of finished tasks returns without
        # yielding, so the done callbacks that drop them from _tasks would never get to run.
        while pending := [task for task in self._tasks if not task.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    # -- internals -------------------------------------------------------------------------------

    def _record(self, app: str, machine_id: str) -> _Record:
        rec = self._apps.get(app, {}).get(machine_id)
        if rec is None:
            raise EmulatorError(404, "machine not found")
        return rec

    def _live_record(self, app: str, machine_id: str) -> _Record:
        rec = self._record(app, machine_id)
        if not rec.live:
            raise EmulatorError(404, f"machine not found: {rec.id} has been destroyed")
        return rec

    def _to_machine(
        self, rec: _Record, *, include_lease: bool = False, summary: bool = False
    ) -> Machine:
        lease = self._active_lease(rec) if include_lease else None
        return Machine(
            id=rec.id,
            name=rec.name,
            state=rec.state,
            region=rec.region,
            instance_id=rec.version,
            version=rec.version,
            private_ip=rec.private_ip,
            config=None if summary else rec.config.model_copy(deep=True),
            image_ref=image_ref_for(rec.config.image or ""),
            created_at=_iso(rec.created_at),
            updated_at=_iso(rec.updated_at),
            events=None if summary else [e.model_copy() for e in rec.events],
            checks=[],
            host_status="ok",
            lease=(
                StrippedLease(
                    description=lease.description,
                    expires_at=int(lease.expires_at),
                    owner=lease.owner,
                )
                if lease is not None
                else None
            ),
        )

    def _touch(self, rec: _Record) -> None:
        rec.updated_at = self._clock()
        # Waking the waiters is harmless and lets them re-check (e.g. a version they wait for).
        rec.changed.set()
        rec.changed = asyncio.Event()

    def _event(
        self, rec: _Record, kind: str, status: str, *, source: str, request: Any = None
    ) -> None:
        event = MachineEvent(
            id=new_ulid(self._clock()),
            type=kind,
            status=status,
            source=source,
            timestamp=int(self._clock() * 1000),
            request=request,
        )
        rec.events.insert(0, event)
        del rec.events[_MAX_EVENTS:]

    def _set_state(
        self, rec: _Record, state: str, kind: str, *, source: str = "flyd", request: Any = None
    ) -> None:
        rec.state = state
        self._event(rec, kind, state, source=source, request=request)
        self._touch(rec)

    def _next_op(self, rec: _Record) -> int:
        rec.op += 1
        return rec.op

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _begin_start(self, rec: _Record) -> None:
        resume = rec.state == "suspended"
        self._set_state(rec, "starting", "start", source="user")
        self._spawn(self._run_start(rec, self._next_op(rec), resume=resume))

    def _begin_restart(self, rec: _Record) -> None:
        self._set_state(rec, "updating", "restart", source="user")
        self._spawn(self._run_restart(rec, self._next_op(rec)))

    def _begin_destroy(self, rec: _Record, *, source: str) -> None:
        self._set_state(rec, "destroying", "destroy", source=source)
        rec.lease = None
        self._spawn(self._run_destroy(rec, self._next_op(rec)))

    async def _run_start(self, rec: _Record, op: int, *, resume: bool) -> None:
        async with rec.lock:
            if rec.op != op:
                return
            try:
                if resume:
                    await self.runtime.resume(rec.app, self._to_machine(rec))
                else:
                    await self.runtime.launch(rec.app, self._to_machine(rec))
            except Exception as exc:  # the runtime's failure is the Machine's state, not ours
                if rec.op == op:
                    self._set_state(rec, "failed", "start", request={"error": str(exc)[:500]})
                return
            if rec.op == op:
                self._set_state(rec, "started", "start")

    async def _run_restart(self, rec: _Record, op: int) -> None:
        async with rec.lock:
            if rec.op != op:
                return
            signal, timeout = self._stop_params(rec)
            try:
                await self.runtime.stop(rec.app, self._to_machine(rec), signal, timeout)
                await self.runtime.launch(rec.app, self._to_machine(rec))
            except Exception as exc:
                if rec.op == op:
                    self._set_state(rec, "failed", "start", request={"error": str(exc)[:500]})
                return
            if rec.op == op:
                self._set_state(rec, "started", "start")

    async def _run_stop(
        self,
        rec: _Record,
        op: int,
        signal: str,
        timeout: float,  # noqa: ASYNC109 (the kill grace period)
    ) -> None:
        async with rec.lock:
            if rec.op != op:
                return
            try:
                await self.runtime.stop(rec.app, self._to_machine(rec), signal, timeout)
            except Exception as exc:  # a stop that errs still leaves nothing running we track
                self._event(rec, "stop", "error", source="flyd", request={"error": str(exc)[:500]})
            if rec.op != op:
                return
            self._set_state(
                rec, "stopped", "exit", request={"exit_event": {"requested_stop": True}}
            )
            if rec.config.auto_destroy:
                self._begin_destroy(rec, source="flyd")

    async def _run_suspend(self, rec: _Record, op: int) -> None:
        async with rec.lock:
            if rec.op != op:
                return
            try:
                await self.runtime.suspend(rec.app, self._to_machine(rec))
            except Exception as exc:
                if rec.op == op:
                    self._set_state(rec, "started", "suspend", request={"error": str(exc)[:500]})
                return
            if rec.op == op:
                self._set_state(rec, "suspended", "suspend")

    async def _run_destroy(self, rec: _Record, op: int) -> None:
        async with rec.lock:
            with contextlib.suppress(Exception):  # destroyed it is, whatever the runtime says
                await self.runtime.destroy(rec.app, self._to_machine(rec))
            if rec.op == op:
                self._set_state(rec, "destroyed", "destroy")

    def _stop_params(self, rec: _Record) -> tuple[str, float]:
        return stop_params(rec.config)

    def _should_restart(self, rec: _Record, exit_code: int | None) -> bool:
        restart = rec.config.restart
        policy = (restart.policy if restart else None) or "on-failure"
        if policy == "always":
            return True
        if policy != "on-failure" or exit_code == 0:
            return False
        limit = restart.max_retries if restart and restart.max_retries is not None else None
        return rec.restarts < (DEFAULT_MAX_RESTARTS if limit is None else limit)

    async def _wait_until(
        self,
        rec: _Record,
        targets: Collection[str],
        timeout: float,  # noqa: ASYNC109 (a 408 answer, not a cancellation)
        message: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while rec.state not in targets:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise EmulatorError(408, f"deadline_exceeded: {message}")
            changed = rec.changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    def _active_lease(self, rec: _Record) -> _Lease | None:
        if rec.lease is not None and rec.lease.expires_at <= self._clock():
            rec.lease = None
        return rec.lease

    def _new_lease(self, rec: _Record, ttl: int, description: str | None) -> _Lease:
        rec.lease = _Lease(
            nonce=secrets.token_hex(16),
            expires_at=self._clock() + ttl,
            owner=LEASE_OWNER,
            description=description,
            version=new_ulid(self._clock()),
        )
        return rec.lease

    def _check_lease(self, rec: _Record, nonce: str | None) -> None:
        current = self._active_lease(rec)
        if current is None:
            return
        if nonce is None or not _same(nonce, current.nonce):
            raise EmulatorError(409, self._held_message(rec, current))

    def _held_message(self, rec: _Record, lease: _Lease) -> str:
        return (
            f"machine ID {rec.id} lease currently held by {lease.owner}, "
            f"expires at {_iso(lease.expires_at)}"
        )


def stop_params(config: MachineConfig | None) -> tuple[str, float]:
    """The stop signal and kill timeout (seconds) of a Machine's config: its `stop_config`,
    else Fly's SIGINT and 5 s; the timeout at most 300 s, as on Fly."""
    stop_config = config.stop_config if config is not None else None
    signal = (stop_config.signal if stop_config else None) or DEFAULT_STOP_SIGNAL
    configured = stop_config.timeout if stop_config else None
    timeout = parse_go_duration(configured) if configured else DEFAULT_STOP_TIMEOUT
    return signal, min(timeout, MAX_STOP_TIMEOUT)


def _same(given: str, expected: str) -> bool:
    # Constant-time, and safe for non-ASCII header values (compare_digest on str refuses them).
    return hmac.compare_digest(given.encode(), expected.encode())


def _require_image(config: MachineConfig) -> None:
    if not config.image:
        raise EmulatorError(422, "invalid config.image: an image is required")


def _private_ip() -> str:
    # A 6PN-looking (fdaa::/16) address; nothing routes to it locally.
    return "fdaa:0:1:a7b:{:x}:{:x}:{:x}:2".format(*(secrets.randbits(16) for _ in range(3)))


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"after:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        text = base64.urlsafe_b64decode(padded.encode()).decode()
        prefix, _, seq = text.partition(":")
        if prefix != "after":
            raise ValueError(cursor)
        return int(seq)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EmulatorError(400, "invalid cursor") from exc
