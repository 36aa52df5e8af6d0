"""The emulated Machines API's checks of request bodies: what Fly refuses, the emulator refuses.

Independent of the client's models, which are lenient on purpose (a newer API must never break
parsing): a body is checked against the request schemas of Fly's spec
(`spec/machines-requests.json`: the spec's types and enums), then against the rules Fly applies
beyond the spec (guest sizes from Fly's machine-sizing guide, positive counts, valid durations),
and against what the emulator will not run on the host (`config.env` and secret names that would
change what code runs there or where its connections go; secrets that would change what only the
runtime says: `RUNTIME_ENV_NAMES`).

Refusals are `EmulatorError`s in Fly's error-body shape (`{"error": "..."}`): 400 for a body that
is not JSON, nested too deeply, or of the wrong types (Go's decoder refuses those); 422 for a config
of the right types that Fly does not accept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from flyfn.emulator.state import EmulatorError
from flyfn.fly.autostop import autostop_from_bool
from flyfn.fly.durations import parse_go_duration
from flyfn.fly.env import FLY_API_HOSTNAME, FLY_API_TOKEN, GROUP_ENV, HOME_APP_ENV
from flyfn.fly.limits import GUEST_MB_STEP, MEMORY_MB_PER_CPU, MEMORY_MB_STEP

__all__ = [
    "GUEST_MB_STEP",
    "MAX_JSON_DEPTH",
    "REFUSED_ENV_NAMES",
    "REFUSED_ENV_PREFIXES",
    "REFUSED_NETWORK_ENV_NAMES",
    "REFUSED_SECRET_NAMES",
    "RUNTIME_ENV_NAMES",
    "check_body",
    "check_config",
    "check_env_name",
    "check_secret_name",
    "check_secret_values",
    "guest_size_error",
    "parse_json",
]

# Far deeper than any Machines API body (a config nests about 6 levels); a deeper one is refused
# before anything recurses over it.
MAX_JSON_DEPTH = 64
# Machines run on the developer's host: these would change what code runs there (issues 16, 23):
# Python's startup and user site (HOME), the dynamic loader (Linux, macOS), glibc's iconv modules.
REFUSED_ENV_NAMES = frozenset({"DJANGO_SETTINGS_MODULE", "GCONV_PATH", "HOME"})
REFUSED_ENV_PREFIXES = ("PYTHON", "LD_", "DYLD_")
# ... and these where a Machine's outbound connections go or whom they trust (in any case: httpx,
# requests and curl read the lowercase spellings too).
REFUSED_NETWORK_ENV_NAMES = frozenset(
    {
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    }
)
# What only the runtime says on a Machine: the API it talks to (Fly's variables, set after the
# secrets) and its flyfn group and home app (set by flyfn in a function Machine's `config.env`).
# No secret changes them: the API refuses a secret of flyfn's names, and a Machine boots with the
# runtime's values whatever the secrets say (`FLY_API_TOKEN` is a usual secret on Fly).
RUNTIME_ENV_NAMES = frozenset({FLY_API_HOSTNAME, FLY_API_TOKEN, GROUP_ENV, HOME_APP_ENV})
REFUSED_SECRET_NAMES = frozenset({GROUP_ENV, HOME_APP_ENV})
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONCURRENCY_TYPES = frozenset({"connections", "requests"})
_SCHEMAS = "spec/machines-requests.json"
_DURATION_FIELDS = frozenset({"timeout", "interval", "grace_period"})


def parse_json(body: bytes) -> Any:
    """The body as JSON (None when empty); 400 when it is not JSON or nested too deeply."""
    if not body.strip():
        return None
    try:
        data = json.loads(body)
    except RecursionError as exc:
        raise EmulatorError(400, "invalid JSON body: nested too deeply") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise EmulatorError(400, f"invalid JSON body: {exc}") from exc
    if _depth_exceeds(data, MAX_JSON_DEPTH):
        raise EmulatorError(400, f"invalid JSON body: nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def _depth_exceeds(data: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def check_body(schema: str, data: Any, *, enum_status: int = 422) -> Any:
    """`data` checked against the spec's `schema` (e.g. `CreateMachineRequest`), in the form the
    client's models read: nulls dropped (Go reads null as absent) and the old boolean `autostop`
    (which Fly still accepts) as its string. Raises EmulatorError: 400 for wrong types,
    `enum_status` for a value outside an enum, 422 for a config Fly refuses."""
    if not isinstance(data, dict):
        raise EmulatorError(400, "invalid request body: a JSON object is required")
    data = _normalised(data)
    errors = sorted(_validator(schema).iter_errors(data), key=_error_order)
    if errors:
        error = errors[0]
        where = _path(error.absolute_path) or "body"
        status = enum_status if error.validator == "enum" else 400
        raise EmulatorError(status, f"invalid {where}: {_brief(error)}")
    if isinstance(data.get("config"), dict):
        check_config(data["config"])
    return data


def check_config(config: dict[str, Any]) -> None:
    """Fly's rules beyond the spec's types, and the env names the emulator will not run: 422."""
    for name in config.get("env") or {}:
        check_env_name("config.env", name)
    guest = config.get("guest")
    if isinstance(guest, dict):
        problem = guest_size_error(guest.get("cpu_kind"), guest.get("cpus"), guest.get("memory_mb"))
        if problem is not None:
            raise EmulatorError(422, f"invalid config.guest: {problem}")
    restart = config.get("restart") or {}
    if restart.get("max_retries", 0) < 0:
        raise EmulatorError(422, "invalid config.restart.max_retries: must not be negative")
    for i, service in enumerate(config.get("services") or []):
        _check_service(f"config.services[{i}]", service)
    for where, text in _durations(config, "config"):
        try:
            seconds = parse_go_duration(text)
        except ValueError:
            seconds = -1.0
        if seconds < 0:
            raise EmulatorError(422, f"invalid {where}: {text!r} is not a duration such as '10s'")


def check_env_name(where: str, name: str) -> None:
    """400 for a name that is no environment variable name; 422 for one the emulator will not
    set on its host (`PYTHON*`, `LD_*`, `DYLD_*`, `GCONV_PATH`, `HOME`, `DJANGO_SETTINGS_MODULE`;
    CA bundles and proxies)."""
    if not _ENV_NAME.fullmatch(name):
        raise EmulatorError(
            400, f"invalid {where}: {name[:60]!r} is not an environment variable name"
        )
    if name in REFUSED_ENV_NAMES or name.startswith(REFUSED_ENV_PREFIXES):
        raise EmulatorError(
            422,
            f"invalid {where}: {name} is not allowed in an emulated Machine "
            "(it would change what code runs on this host)",
        )
    if name.upper() in REFUSED_NETWORK_ENV_NAMES:
        raise EmulatorError(
            422,
            f"invalid {where}: {name} is not allowed in an emulated Machine "
            "(it would change where its connections from this host go or whom they trust)",
        )


def check_secret_name(where: str, name: str) -> None:
    """`check_env_name`, and 422 for flyfn's own names (`REFUSED_SECRET_NAMES`)."""
    check_env_name(where, name)
    if name in REFUSED_SECRET_NAMES:
        raise EmulatorError(
            422,
            f"invalid {where}: {name} is set by flyfn in a function Machine's config; "
            "a secret must not change a Machine's group or home app",
        )


def check_secret_values(data: Any) -> dict[str, str | None]:
    """An `AppSecretsUpdateRequest` body's `values`: names to values, null to unset."""
    values = data.get("values") if isinstance(data, dict) else None
    if not isinstance(values, dict) or not values:
        raise EmulatorError(400, "invalid body: values must be an object of names to values")
    for name, value in values.items():
        check_secret_name("values", name)
        if value is not None and not isinstance(value, str):
            raise EmulatorError(400, f"invalid values.{name}: a string (or null to unset)")
    return values


def guest_size_error(cpu_kind: str | None, cpus: int | None, memory_mb: int | None) -> str | None:
    """Why Fly refuses this guest size, or None. Fly's machine-sizing rules: for shared CPUs
    memory a multiple of 256 MB with `256·cpus ≤ MB ≤ 2048·cpus`, for performance ones a multiple
    of 1024 MB with `2048·cpus ≤ MB ≤ 8192·cpus`. Absent fields take Fly's defaults (shared,
    1 CPU, the least memory)."""
    kind = cpu_kind or "shared"
    if kind not in MEMORY_MB_PER_CPU:
        return f"cpu_kind {kind!r} is not one of 'shared', 'performance'"
    count = 1 if cpus is None else cpus
    if count < 1:
        return f"cpus must be at least 1, not {count}"
    low, high = (per_cpu * count for per_cpu in MEMORY_MB_PER_CPU[kind])
    if memory_mb is None:
        return None
    step = MEMORY_MB_STEP[kind]
    if memory_mb % step or not low <= memory_mb <= high:
        return (
            f"memory_mb {memory_mb} is not allowed for {count} {kind} CPU(s): it must be a "
            f"multiple of {step} from {low} to {high}"
        )
    return None


def _check_service(where: str, service: dict[str, Any]) -> None:
    port = service.get("internal_port")
    if port is not None and not 1 <= port <= 65535:
        raise EmulatorError(422, f"invalid {where}.internal_port: {port} is not a port")
    for j, entry in enumerate(service.get("ports") or []):
        for key in ("port", "start_port", "end_port"):
            value = entry.get(key)
            if value is not None and not 1 <= value <= 65535:
                raise EmulatorError(422, f"invalid {where}.ports[{j}].{key}: {value} is not a port")
    if (service.get("min_machines_running") or 0) < 0:
        raise EmulatorError(422, f"invalid {where}.min_machines_running: must not be negative")
    concurrency = service.get("concurrency") or {}
    kind = concurrency.get("type")
    if kind is not None and kind not in _CONCURRENCY_TYPES:
        raise EmulatorError(
            422, f"invalid {where}.concurrency.type: {kind!r} is not 'connections' or 'requests'"
        )
    for key in ("soft_limit", "hard_limit"):
        if (concurrency.get(key) or 0) < 0:
            raise EmulatorError(422, f"invalid {where}.concurrency.{key}: must not be negative")


def _durations(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """Every Go duration string in a config (stop_config.timeout, checks' interval, ...)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("env", "metadata"):
                continue
            if key in _DURATION_FIELDS and isinstance(item, str):
                yield f"{where}.{key}", item
            else:
                yield from _durations(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _durations(item, f"{where}[{i}]")


def _normalised(value: Any) -> Any:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if item is None:
                continue
            if key == "autostop":
                item = autostop_from_bool(item)
            out[key] = _normalised(item)
        return out
    if isinstance(value, list):
        return [_normalised(item) for item in value]
    return value


@cache
def _validator(schema: str) -> Draft202012Validator:
    text = resources.files("flyfn.emulator").joinpath(_SCHEMAS).read_text(encoding="utf-8")
    components = json.loads(text)["components"]
    if schema not in components["schemas"]:
        raise KeyError(schema)
    root = {"$ref": f"#/components/schemas/{schema}", "components": components}
    return Draft202012Validator(root)


def _error_order(error: ValidationError) -> tuple[int, int]:
    # A wrong type before a value outside an enum (400 before 422), shallow before deep.
    return (1 if error.validator == "enum" else 0, len(error.absolute_path))


def _path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _brief(error: ValidationError) -> str:
    if error.validator == "enum":
        allowed = ", ".join(repr(v) for v in error.validator_value)
        return f"{_shown(error.instance)} is not one of {allowed}"
    if error.validator == "type":
        return f"{_shown(error.instance)} is not of type {error.validator_value!r}"
    return re.sub(r"\s+", " ", error.message)[:200]


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
