"""fly.toml as `flyfn dev` deploys it: the app's name and region, `[env]`, services, processes,
VM size, stop signal and release command, turned into the app Machines' configs as `fly deploy`
would make them.

Only what shapes a Machine is read; anything else in the file is ignored, as a newer fly.toml must
not break `flyfn dev`. Errors name the file and the key (`FlyTomlError`).
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flyfn.fly.autostop import autostop_from_bool
from flyfn.machines.models import (
    MachineConfig,
    MachineGuest,
    MachineInit,
    MachinePort,
    MachineService,
    MachineServiceConcurrency,
    StopConfig,
)

__all__ = ["DEFAULT_PROCESS_GROUP", "FlyToml", "FlyTomlError", "load_fly_toml"]

DEFAULT_PROCESS_GROUP = "app"
_SIZE = re.compile(r"^(shared|performance)-cpu-(\d+)x$")
_MEMORY = re.compile(r"^\s*(\d+)\s*(mb|gb)?\s*$", re.IGNORECASE)


class FlyTomlError(ValueError):
    """fly.toml cannot be read or holds a value `flyfn dev` cannot use."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Concurrency(_Section):
    type: str | None = None
    soft_limit: int | None = None
    hard_limit: int | None = None

    def to_machine(self) -> MachineServiceConcurrency:
        return MachineServiceConcurrency(
            type=self.type, soft_limit=self.soft_limit, hard_limit=self.hard_limit
        )


class ServicePort(_Section):
    port: int | None = None
    start_port: int | None = None
    end_port: int | None = None
    handlers: list[str] = Field(default_factory=list)
    force_https: bool | None = None
    http_options: dict[str, Any] | None = None


class _ServiceCommon(_Section):
    internal_port: int = 8080
    auto_stop_machines: str | None = None
    auto_start_machines: bool | None = None
    min_machines_running: int | None = None
    processes: list[str] = Field(default_factory=list)
    concurrency: Concurrency | None = None

    @field_validator("auto_stop_machines", mode="before")
    @classmethod
    def _bool_autostop(cls, value: object) -> object:
        return autostop_from_bool(value)

    def serves(self, group: str) -> bool:
        return not self.processes or group in self.processes

    def to_machine(self) -> MachineService:
        raise NotImplementedError

    def _service(self, protocol: str, ports: list[MachinePort]) -> MachineService:
        return MachineService(
            protocol=protocol,
            internal_port=self.internal_port,
            # fly deploy's defaults when the keys are left out: autostop off, autostart on.
            autostop=self.auto_stop_machines or "off",
            autostart=True if self.auto_start_machines is None else self.auto_start_machines,
            min_machines_running=self.min_machines_running or 0,
            ports=ports,
            concurrency=self.concurrency.to_machine() if self.concurrency else None,
        )


class HttpService(_ServiceCommon):
    """`[http_service]`: ports 80 (http) and 443 (tls, http) to `internal_port`."""

    force_https: bool = False
    http_options: dict[str, Any] | None = None

    def to_machine(self) -> MachineService:
        return self._service(
            "tcp",
            [
                MachinePort(
                    port=80,
                    handlers=["http"],
                    force_https=self.force_https or None,
                    http_options=self.http_options,
                ),
                MachinePort(port=443, handlers=["tls", "http"], http_options=self.http_options),
            ],
        )


class Service(_ServiceCommon):
    """One `[[services]]` entry."""

    protocol: str = "tcp"
    ports: list[ServicePort] = Field(default_factory=list)

    def to_machine(self) -> MachineService:
        return self._service(
            self.protocol,
            [
                MachinePort(
                    port=p.port,
                    start_port=p.start_port,
                    end_port=p.end_port,
                    handlers=p.handlers or None,
                    force_https=p.force_https,
                    http_options=p.http_options,
                )
                for p in self.ports
            ],
        )


class Vm(_Section):
    """One `[[vm]]` entry: `size` (`shared-cpu-2x`), or `cpu_kind`/`cpus`, and `memory`."""

    size: str | None = None
    cpu_kind: str | None = None
    cpus: int | None = None
    memory: str | int | None = None
    memory_mb: int | None = None
    processes: list[str] = Field(default_factory=list)

    def to_guest(self) -> MachineGuest:
        kind, cpus = self.cpu_kind or "shared", self.cpus or 1
        if self.size:
            match = _SIZE.match(self.size.strip().lower())
            if match is None:
                raise ValueError(
                    f"[[vm]] size {self.size!r}: expected shared-cpu-Nx or performance-cpu-Nx"
                )
            kind, cpus = match.group(1), int(match.group(2))
        memory = self.memory_mb or _memory_mb(self.memory)
        if memory is None:
            memory = 256 * cpus if kind == "shared" else 2048 * cpus
        return MachineGuest(cpu_kind=kind, cpus=cpus, memory_mb=memory)


def _memory_mb(value: str | int | None) -> int | None:
    if value is None or isinstance(value, int):
        return value
    match = _MEMORY.match(value)
    if match is None:
        raise ValueError(f"[[vm]] memory {value!r}: expected a size such as 512mb or 1gb")
    number = int(match.group(1))
    return number * 1024 if (match.group(2) or "mb").lower() == "gb" else number


class Build(_Section):
    dockerfile: str | None = None
    image: str | None = None


class Deploy(_Section):
    release_command: str | None = None


class Metrics(_Section):
    port: int | None = None
    path: str | None = None


class FlyToml(_Section):
    """The parts of a fly.toml that shape the app's Machines. `path` is where it was read."""

    path: Path
    app: str | None = None
    primary_region: str | None = None
    kill_signal: str | None = None
    kill_timeout: str | int | None = None
    build: Build = Field(default_factory=Build)
    deploy: Deploy = Field(default_factory=Deploy)
    env: dict[str, str] = Field(default_factory=dict)
    processes: dict[str, str] = Field(default_factory=dict)
    http_service: HttpService | None = None
    services: list[Service] = Field(default_factory=list)
    vm: list[Vm] = Field(default_factory=list)
    metrics: Metrics | list[Metrics] | None = None

    @field_validator("env", mode="before")
    @classmethod
    def _env_as_strings(cls, value: object) -> object:
        # fly.toml allows numbers and booleans in [env]; Machines see them as strings.
        if isinstance(value, dict):
            return {str(k): _env_text(v) for k, v in value.items()}
        return value

    @property
    def directory(self) -> Path:
        """The build context: fly.toml's own directory."""
        return self.path.parent

    @property
    def dockerfile(self) -> Path | None:
        """The Dockerfile `fly deploy` would build (`[build] dockerfile`, else `Dockerfile`
        beside fly.toml), when it exists; None for a prebuilt `[build] image`."""
        if self.build.image and not self.build.dockerfile:
            return None
        candidate = self.directory / (self.build.dockerfile or "Dockerfile")
        return candidate if candidate.is_file() else None

    def process_groups(self) -> list[str]:
        """The app's process groups, in fly.toml's order (`app` when `[processes]` is absent)."""
        return list(self.processes) or [DEFAULT_PROCESS_GROUP]

    def machine_config(self, group: str, image: str) -> MachineConfig:
        """The config `fly deploy` gives an app Machine of process group `group`."""
        services = [s.to_machine() for s in self._services() if s.serves(group)]
        vm = next((v for v in self.vm if not v.processes or group in v.processes), None)
        command = self.processes.get(group)
        return MachineConfig(
            image=image,
            env=dict(self.env) or None,
            metadata={"fly_process_group": group, "fly_platform_version": "v2"},
            services=services or None,
            guest=vm.to_guest() if vm is not None else None,
            init=MachineInit(cmd=shlex.split(command)) if command else None,
            stop_config=self._stop_config(),
        )

    def _services(self) -> list[_ServiceCommon]:
        found: list[_ServiceCommon] = list(self.services)
        if self.http_service is not None:
            found.insert(0, self.http_service)
        return found

    def _stop_config(self) -> StopConfig | None:
        if self.kill_signal is None and self.kill_timeout is None:
            return None
        timeout = self.kill_timeout
        return StopConfig(
            signal=self.kill_signal,
            timeout=f"{timeout}s" if isinstance(timeout, int) else timeout,
        )


def _env_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_fly_toml(path: Path) -> FlyToml:
    """Read and check `path`; FlyTomlError naming the file and the problem."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise FlyTomlError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise FlyTomlError(f"{path}: not valid TOML ({exc})") from None
    try:
        parsed = FlyToml.model_validate({**data, "path": path.resolve()})
        for group in parsed.process_groups():
            parsed.machine_config(group, "check")  # sizes and durations fail here, not at boot
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise FlyTomlError(f"{path}: {where}: {first['msg']}") from None
    except ValueError as exc:
        raise FlyTomlError(f"{path}: {exc}") from None
    return parsed
