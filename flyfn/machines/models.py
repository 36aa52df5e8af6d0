"""Pydantic models of the Fly Machines API bodies (requests and responses) used by flyfn.

Field names and types follow `machines-openapi-newest.json`; the shapes of the older specs
(boolean `autostop`, `{"time.Duration": ns}` durations) are accepted on input and normalised.
Every model keeps unknown fields (`extra="allow"`) so a newer API never breaks parsing, and
`to_wire()` (= `model_dump(mode="json", exclude_none=True)`) is the form sent on the wire.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

from flyfn.fly.autostop import AUTOSTOP_MODES, lenient_autostop
from flyfn.fly.durations import go_duration

__all__ = [
    "AUTOSTOP_MODES",
    "KNOWN_STATES",
    "Autostop",
    "CheckStatus",
    "CreateLeaseRequest",
    "CreateMachineRequest",
    "Duration",
    "ErrorResponse",
    "FlyModel",
    "ImageRef",
    "Lease",
    "Machine",
    "MachineCheck",
    "MachineConfig",
    "MachineEvent",
    "MachineGuest",
    "MachineHTTPHeader",
    "MachineInit",
    "MachineMount",
    "MachinePort",
    "MachineProcess",
    "MachineRestart",
    "MachineService",
    "MachineServiceCheck",
    "MachineServiceConcurrency",
    "MachineState",
    "MetadataValue",
    "StartMachineResponse",
    "StopConfig",
    "StopRequest",
    "StrippedLease",
    "UpdateMachineRequest",
    "WaitMachineResponse",
]

# A plain str: the API adds states over time and an unknown one must not fail a parse.
MachineState = str

KNOWN_STATES: frozenset[str] = frozenset(
    {
        "creating",
        "created",
        "starting",
        "started",
        "stopping",
        "stopped",
        "suspending",
        "suspended",
        "replacing",
        "updating",
        "restarting",
        "destroying",
        "destroyed",
        "failed",
        "launch_failed",
        "replaced",
        "migrated",
    }
)

Autostop = Annotated[str, BeforeValidator(lenient_autostop)]
"""`"off"|"stop"|"suspend"`; also accepts `True` (stop) / `False` (off) on input."""
# (Values outside AUTOSTOP_MODES are tolerated as-is, like unknown Machine states; settings
# validation (flyfn.conf) rejects typos in what the user configures.)

Duration = Annotated[str, BeforeValidator(go_duration)]
"""A Go duration string such as `"10s"` or `"500ms"`."""


class FlyModel(BaseModel):
    """Base of every Machines API model: unknown fields kept, optional fields default to None."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def to_wire(self) -> dict[str, Any]:
        """The JSON body sent to the API (`None` fields left out)."""
        return self.model_dump(mode="json", exclude_none=True)


class ImageRef(FlyModel):
    registry: str | None = None
    repository: str | None = None
    tag: str | None = None
    digest: str | None = None
    labels: dict[str, str] | None = None


class MachineEvent(FlyModel):
    id: str | None = None
    type: str | None = None
    status: str | None = None
    source: str | None = None
    timestamp: int | None = None
    request: Any = None


class CheckStatus(FlyModel):
    name: str | None = None
    status: str | None = None
    output: str | None = None
    updated_at: str | None = None


class MachineGuest(FlyModel):
    cpu_kind: str | None = None
    cpus: int | None = None
    memory_mb: int | None = None
    gpu_kind: str | None = None
    gpus: int | None = None
    host_dedication_id: str | None = None
    kernel_args: list[str] | None = None
    max_memory_mb: int | None = None
    persist_rootfs: str | None = None
    required_host_features: list[str] | None = None


class MachinePort(FlyModel):
    port: int | None = None
    start_port: int | None = None
    end_port: int | None = None
    handlers: list[str] | None = None
    force_https: bool | None = None
    http_options: dict[str, Any] | None = None
    tls_options: dict[str, Any] | None = None
    proxy_proto_options: dict[str, Any] | None = None


class MachineServiceConcurrency(FlyModel):
    type: str | None = None
    soft_limit: int | None = None
    hard_limit: int | None = None


class MachineHTTPHeader(FlyModel):
    name: str | None = None
    values: list[str] | None = None


class MachineServiceCheck(FlyModel):
    type: str | None = None
    port: int | None = None
    interval: Duration | None = None
    timeout: Duration | None = None
    grace_period: Duration | None = None
    method: str | None = None
    path: str | None = None
    protocol: str | None = None
    headers: list[MachineHTTPHeader] | None = None
    tls_server_name: str | None = None
    tls_skip_verify: bool | None = None


class MachineCheck(MachineServiceCheck):
    kind: str | None = None


class MachineService(FlyModel):
    protocol: str | None = None
    internal_port: int | None = None
    autostart: bool | None = None
    autostop: Autostop | None = None
    min_machines_running: int | None = None
    ports: list[MachinePort] | None = None
    concurrency: MachineServiceConcurrency | None = None
    checks: list[MachineServiceCheck] | None = None
    force_instance_description: str | None = None
    force_instance_key: str | None = None


class MachineRestart(FlyModel):
    policy: str | None = None
    max_retries: int | None = None


class StopConfig(FlyModel):
    signal: str | None = None
    timeout: Duration | None = None


class MachineInit(FlyModel):
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    exec: list[str] | None = None
    kernel_args: list[str] | None = None
    swap_size_mb: int | None = None
    tty: bool | None = None


class MachineProcess(FlyModel):
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    exec: list[str] | None = None
    env: dict[str, str] | None = None
    user: str | None = None
    ignore_app_secrets: bool | None = None
    env_from: list[dict[str, Any]] | None = None
    secrets: list[dict[str, Any]] | None = None


class MachineMount(FlyModel):
    name: str | None = None
    path: str | None = None
    volume: str | None = None
    size_gb: int | None = None
    encrypted: bool | None = None


class MachineConfig(FlyModel):
    image: str | None = None
    env: dict[str, str] | None = None
    metadata: dict[str, str] | None = None
    guest: MachineGuest | None = None
    services: list[MachineService] | None = None
    restart: MachineRestart | None = None
    auto_destroy: bool | None = None
    processes: list[MachineProcess] | None = None
    init: MachineInit | None = None
    checks: dict[str, MachineCheck] | None = None
    stop_config: StopConfig | None = None
    mounts: list[MachineMount] | None = None
    schedule: str | None = None
    standbys: list[str] | None = None
    disable_machine_autostart: bool | None = None
    size: str | None = None
    # Rarely used by flyfn: kept as plain JSON so they round-trip untouched.
    files: list[dict[str, Any]] | None = None
    statics: list[dict[str, Any]] | None = None
    containers: list[dict[str, Any]] | None = None
    dns: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    rootfs: dict[str, Any] | None = None
    spot: dict[str, Any] | None = None
    cache_drive: dict[str, Any] | None = None


class StrippedLease(FlyModel):
    description: str | None = None
    expires_at: int | None = None
    owner: str | None = None


class Lease(FlyModel):
    nonce: str | None = None
    expires_at: int | None = None
    owner: str | None = None
    description: str | None = None
    version: str | None = None


class Machine(FlyModel):
    id: str
    name: str | None = None
    state: MachineState | None = None
    region: str | None = None
    instance_id: str | None = None
    version: str | None = None
    private_ip: str | None = None
    config: MachineConfig | None = None
    incomplete_config: MachineConfig | None = None
    image_ref: ImageRef | None = None
    created_at: str | None = None
    updated_at: str | None = None
    events: list[MachineEvent] | None = None
    checks: list[CheckStatus] | None = None
    host_status: str | None = None
    host_features: list[str] | None = None
    lease: StrippedLease | None = None
    cordoned: bool | None = None
    nonce: str | None = None

    @property
    def current_version(self) -> str | None:
        """`version`, or the deprecated `instance_id` that older APIs return instead."""
        return self.version or self.instance_id


class CreateMachineRequest(FlyModel):
    config: MachineConfig
    name: str | None = None
    region: str | None = None
    skip_launch: bool | None = None
    skip_service_registration: bool | None = None
    skip_secrets: bool | None = None
    lease_ttl: int | None = None
    min_secrets_version: int | None = None


class UpdateMachineRequest(CreateMachineRequest):
    current_version: str | None = None


class StopRequest(FlyModel):
    signal: str | None = None
    timeout: Duration | None = None


class WaitMachineResponse(FlyModel):
    ok: bool | None = None
    state: MachineState | None = None
    version: str | None = None
    event_id: str | None = None


class StartMachineResponse(FlyModel):
    previous_state: MachineState | None = None
    migrated: bool | None = None
    new_host: str | None = None


class CreateLeaseRequest(FlyModel):
    ttl: int | None = None
    description: str | None = None


class ErrorResponse(FlyModel):
    error: str | None = None
    # "unknown" | "insufficient_capacity" | "volume_placement_capacity" | "name_taken" | newer ones
    status: str | None = None
    details: Any = None


class MetadataValue(FlyModel):
    value: str | None = None
