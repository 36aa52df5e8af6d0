"""The emulated Machines API refuses what Fly refuses: the spec's types and enums, Fly's guest
sizes, deeply nested bodies, and `config.env` names that would change what runs on the host.
Every refusal is Fly's error-body shape (`{"error": ...}`), never a 500."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flyfn.emulator.validation import guest_size_error
from tests.support_machines_api import EMULATOR_APP

MACHINES = f"/v1/apps/{EMULATOR_APP}/machines"
IMAGE = "registry.fly.io/testapp:deployment-01"


async def create(http: httpx.AsyncClient, **config: Any) -> httpx.Response:
    return await http.post(MACHINES, json={"config": {"image": IMAGE, **config}})


def refusal(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) <= {"error", "status"}
    for word in words:
        assert word in body["error"]
    error: str = body["error"]
    return error


# The examples: each is a config Fly refuses, that the lenient client models accept.
@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"restart": {"policy": "sometimes"}}, "config.restart.policy"),
        ({"guest": {"cpus": -5}}, "config.guest"),
        ({"stop_config": {"signal": "AAA"}}, "config.stop_config.signal"),
        ({"services": [{"internal_port": 8000, "autostop": "sometimes"}]}, "autostop"),
        ({"guest": {"cpu_kind": "quantum", "cpus": 1}}, "cpu_kind"),
        ({"stop_config": {"timeout": "soon"}}, "config.stop_config.timeout"),
        ({"stop_config": {"timeout": "nan"}}, "config.stop_config.timeout"),
        ({"stop_config": {"timeout": "\u0663s"}}, "config.stop_config.timeout"),
        ({"checks": {"web": {"interval": "inf"}}}, "config.checks.web.interval"),
        ({"services": [{"internal_port": 0}]}, "internal_port"),
        ({"services": [{"internal_port": 80, "concurrency": {"type": "vibes"}}]}, "type"),
        ({"restart": {"policy": "always", "max_retries": -1}}, "max_retries"),
    ],
)
async def test_invalid_configs_are_refused_with_422_naming_the_field(
    emulator_http: httpx.AsyncClient, config: dict[str, Any], where: str
) -> None:
    refusal(await create(emulator_http, **config), 422, where)
    assert (await emulator_http.get(MACHINES)).json() == []  # nothing was created


async def test_enum_refusals_list_the_allowed_values(emulator_http: httpx.AsyncClient) -> None:
    error = refusal(await create(emulator_http, restart={"policy": "sometimes"}), 422)
    assert "'no', 'always', 'on-failure'" in error
    assert '"sometimes"' in error


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"guest": {"cpus": "many"}}, "config.guest.cpus"),
        ({"env": {"A": 1}}, "config.env.A"),
        ({"services": "web"}, "config.services"),
        ({"auto_destroy": "yes"}, "config.auto_destroy"),
        ({"metadata": ["a"]}, "config.metadata"),
    ],
)
async def test_wrong_types_are_400(
    emulator_http: httpx.AsyncClient, config: dict[str, Any], where: str
) -> None:
    refusal(await create(emulator_http, **config), 400, where)


async def test_what_fly_accepts_is_accepted(emulator_http: httpx.AsyncClient) -> None:
    response = await create(
        emulator_http,
        guest={"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096},
        restart={"policy": "on-failure", "max_retries": 3},
        stop_config={"signal": "SIGTERM", "timeout": "1m30s"},
        # The old boolean autostop is still accepted (Fly: "for backward compatibility").
        services=[{"internal_port": 8000, "autostop": True, "ports": [{"port": 443}]}],
        env={"DATABASE_URL": "sqlite:///x", "PYTHONISH": None},  # null reads as absent
        brand_new_field={"x": 1},  # unknown fields are ignored, as Go ignores them
    )
    assert response.status_code == 200, response.text
    assert response.json()["config"]["services"][0]["autostop"] == "stop"


async def test_update_is_checked_too_and_a_refusal_changes_nothing(
    emulator_http: httpx.AsyncClient,
) -> None:
    created = (await create(emulator_http, env={"A": "1"})).json()
    url = f"{MACHINES}/{created['id']}"
    bad = {"config": {"image": IMAGE, "env": {"A": "2"}, "guest": {"memory_mb": 300}}}
    refusal(await emulator_http.post(url, json=bad), 422, "memory_mb 300")
    machine = (await emulator_http.get(url)).json()
    assert machine["config"]["env"] == {"A": "1"}
    assert machine["version"] == created["version"]


async def test_other_bodies_follow_the_spec(emulator_http: httpx.AsyncClient) -> None:
    machine = (await create(emulator_http)).json()
    url = f"{MACHINES}/{machine['id']}"
    refusal(await emulator_http.post(f"{url}/lease", json={"ttl": "long"}), 400, "ttl")
    refusal(await emulator_http.post(f"{url}/metadata/k", json={"value": 5}), 400, "value")
    refusal(await emulator_http.post(f"{url}/stop", json={"signal": "AAA"}), 400, "signal")


# -- guest sizes (Fly's machine-sizing guide) ---------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "cpus", "mb"),
    [
        ("shared", 1, 256),
        ("shared", 1, 2048),
        ("shared", 2, 512),
        ("shared", 8, 16384),
        ("performance", 1, 2048),
        ("performance", 1, 3072),
        ("performance", 1, 8192),
        ("performance", 4, 8192),
        ("performance", 16, 131072),
        (None, None, 1024),  # shared, 1 CPU
        ("performance", 2, None),  # the least memory for it
    ],
)
async def test_guest_sizes_fly_accepts(
    emulator_http: httpx.AsyncClient, kind: str | None, cpus: int | None, mb: int | None
) -> None:
    guest = {k: v for k, v in (("cpu_kind", kind), ("cpus", cpus), ("memory_mb", mb)) if v}
    assert (await create(emulator_http, guest=guest)).status_code == 200
    assert guest_size_error(kind, cpus, mb) is None


@pytest.mark.parametrize(
    ("kind", "cpus", "mb", "rule"),
    [
        ("shared", 1, 300, "multiple of 256 from 256 to 2048"),
        ("shared", 1, 2304, "from 256 to 2048"),
        ("shared", 2, 256, "from 512 to 4096"),
        ("performance", 1, 1024, "from 2048 to 8192"),
        # Performance memory comes in 1024 MB steps.
        ("performance", 1, 2304, "multiple of 1024 from 2048 to 8192"),
        ("performance", 2, 4352, "multiple of 1024 from 4096 to 16384"),
        ("performance", 2, 2048, "from 4096 to 16384"),
        ("performance", 1, 8448, "from 2048 to 8192"),
        ("shared", 0, 256, "cpus must be at least 1"),
    ],
)
async def test_guest_sizes_fly_refuses_are_422_with_the_rule(
    emulator_http: httpx.AsyncClient, kind: str, cpus: int, mb: int, rule: str
) -> None:
    guest = {"cpu_kind": kind, "cpus": cpus, "memory_mb": mb}
    refusal(await create(emulator_http, guest=guest), 422, "invalid config.guest", rule)


# -- what the emulator will not run on the host ---------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "PYTHONHOME",
        "LD_PRELOAD",
        "DJANGO_SETTINGS_MODULE",
        # issue 23: other ways to run code on the host, or to redirect a Machine's connections
        "DYLD_INSERT_LIBRARIES",
        "GCONV_PATH",
        "HOME",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "ALL_PROXY",
    ],
)
async def test_env_that_would_change_what_python_runs_is_refused(
    emulator_http: httpx.AsyncClient, name: str
) -> None:
    refusal(await create(emulator_http, env={name: "/tmp/evil"}), 422, "config.env", name)
    created = (await create(emulator_http, env={"SAFE": "1"})).json()
    update = {"config": {"image": IMAGE, "env": {name: "x"}}}
    refusal(await emulator_http.post(f"{MACHINES}/{created['id']}", json=update), 422, name)


# -- hostile bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [65, 5_000, 200_000])
async def test_deeply_nested_json_is_a_clean_400(
    emulator_http: httpx.AsyncClient, depth: int
) -> None:
    nested = "[" * depth + "]" * depth
    body = '{"config": {"image": "x", "files": ' + nested + "}}"
    response = await emulator_http.post(
        MACHINES, content=body.encode(), headers={"content-type": "application/json"}
    )
    refusal(response, 400, "nested")


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**40), 2**40),
        st.floats(allow_nan=False),
        st.text(max_size=10),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
config_keys = st.sampled_from(
    ["guest", "restart", "services", "stop_config", "env", "metadata", "auto_destroy", "checks"]
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.dictionaries(config_keys, json_values, max_size=4))
async def test_any_config_is_accepted_or_refused_never_a_500(
    emulator_http: httpx.AsyncClient, config: dict[str, Any]
) -> None:
    response = await emulator_http.post(
        MACHINES,
        content=json.dumps({"config": {"image": IMAGE, **config}, "skip_launch": True}),
        headers={"content-type": "application/json"},
    )
    assert response.status_code in (200, 400, 422), response.text
    assert response.json().get("error") or response.status_code == 200
