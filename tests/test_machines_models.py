"""Tests of flyfn.machines.models: new and old spec shapes, autostop, unknown fields/states."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from flyfn.machines import models as m
from tests.support_machines_api import FLY_SPEC_DIR

NEWEST_SPEC = FLY_SPEC_DIR / "machines-openapi-newest.json"

# A Machine as the newest API returns it (abridged from Fly's docs).
NEW_MACHINE: dict[str, Any] = {
    "id": "3d8d9016b4e389",
    "name": "fn-pdf-1",
    "state": "started",
    "region": "ams",
    "instance_id": "01JABCDEF0123456789ABCDEFG",
    "version": "01JABCDEF0123456789ABCDEFG",
    "private_ip": "fdaa:0:1:a7b:1::2",
    "host_status": "ok",
    "cordoned": False,
    "lease": {"owner": "me@example.com", "expires_at": 1720000000, "description": "update"},
    "image_ref": {
        "registry": "registry.fly.io",
        "repository": "shop",
        "tag": "deployment-01H9",
        "digest": "sha256:abc",
        "labels": {"fly.pg": "false"},
    },
    "created_at": "2024-07-01T10:00:00Z",
    "updated_at": "2024-07-01T10:00:05Z",
    "events": [
        {
            "id": "01JEV",
            "type": "start",
            "status": "started",
            "source": "flyd",
            "timestamp": 1719828005000,
            "request": {"foo": "bar"},
        }
    ],
    "checks": [{"name": "http", "status": "passing", "output": "OK", "updated_at": "x"}],
    "config": {
        "image": "registry.fly.io/shop:deployment-01H9",
        "env": {"FLYFN_GROUP": "pdf"},
        "metadata": {"fly_role": "flyfn", "flyfn_group": "pdf"},
        "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 512},
        "auto_destroy": False,
        "restart": {"policy": "on-failure", "max_retries": 3},
        "stop_config": {"signal": "SIGTERM", "timeout": "30s"},
        "init": {"cmd": ["gunicorn"]},
        "checks": {"alive": {"type": "http", "port": 8000, "path": "/up", "interval": "15s"}},
        "services": [
            {
                "protocol": "tcp",
                "internal_port": 8000,
                "autostart": True,
                "autostop": "suspend",
                "min_machines_running": 0,
                "ports": [
                    {"port": 80, "handlers": ["http"], "force_https": True},
                    {"port": 443, "handlers": ["tls", "http"]},
                ],
                "concurrency": {"type": "requests", "soft_limit": 20, "hard_limit": 25},
            }
        ],
    },
}

# The Swagger 2.0 (March 2024) shape: boolean autostop, fly.Duration objects, no version/lease.
OLD_MACHINE: dict[str, Any] = {
    "id": "148ed193b95389",
    "name": "old-one",
    "state": "stopped",
    "region": "iad",
    "instance_id": "01HOLD",
    "private_ip": "fdaa::3",
    "config": {
        "image": "nginx",
        "stop_config": {"signal": "SIGINT", "timeout": {"time.Duration": 10_000_000_000}},
        "checks": {"c": {"type": "tcp", "grace_period": {"time.Duration": 1_500_000_000}}},
        "services": [
            {"protocol": "tcp", "internal_port": 80, "autostop": True, "autostart": True},
            {"protocol": "tcp", "internal_port": 81, "autostop": False},
        ],
    },
    "image_ref": {"registry": "docker.io", "repository": "library/nginx", "tag": "latest"},
    "events": [],
}


def test_new_shape_parses_with_typed_nested_models() -> None:
    machine = m.Machine.model_validate(NEW_MACHINE)
    assert machine.state == "started"
    assert machine.current_version == "01JABCDEF0123456789ABCDEFG"
    assert machine.lease is not None
    assert machine.lease.expires_at == 1720000000
    assert machine.config is not None
    service = machine.config.services[0] if machine.config.services else None
    assert service is not None
    assert service.autostop == "suspend"
    assert service.ports is not None
    assert service.ports[1].handlers == ["tls", "http"]
    assert service.concurrency == m.MachineServiceConcurrency(
        type="requests", soft_limit=20, hard_limit=25
    )
    assert machine.config.checks is not None
    assert machine.config.checks["alive"].interval == "15s"
    assert machine.events is not None
    assert machine.events[0].timestamp == 1719828005000


def test_new_shape_round_trips_to_the_same_json() -> None:
    machine = m.Machine.model_validate(NEW_MACHINE)
    assert machine.to_wire() == NEW_MACHINE


def test_old_shape_normalises_autostop_and_durations() -> None:
    machine = m.Machine.model_validate(OLD_MACHINE)
    assert machine.version is None
    assert machine.current_version == "01HOLD"
    assert machine.config is not None
    assert machine.config.services is not None
    assert [s.autostop for s in machine.config.services] == ["stop", "off"]
    assert machine.config.stop_config == m.StopConfig(signal="SIGINT", timeout="10s")
    assert machine.config.checks is not None
    assert machine.config.checks["c"].grace_period == "1500ms"
    # Sent back in the new form: autostop as a string.
    wire = machine.to_wire()
    assert wire["config"]["services"][0]["autostop"] == "stop"
    assert wire["config"]["stop_config"]["timeout"] == "10s"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (True, "stop"),
        (False, "off"),
        ("off", "off"),
        ("stop", "stop"),
        ("suspend", "suspend"),
        ("Suspend", "suspend"),
        # The OpenAPI 3 YAML conversion of the older spec turns `off` into false / "false".
        ("false", "off"),
        ("true", "stop"),
    ],
)
def test_autostop_accepts_bool_and_string_forms(given: object, expected: str) -> None:
    service = m.MachineService.model_validate({"autostop": given})
    assert service.autostop == expected
    assert service.to_wire() == {"autostop": expected}


def test_autostop_unknown_mode_is_tolerated_not_a_parse_failure() -> None:
    assert m.MachineService.model_validate({"autostop": "hibernate"}).autostop == "hibernate"


def test_autostop_rejects_non_string_non_bool() -> None:
    with pytest.raises(ValidationError):
        m.MachineService.model_validate({"autostop": 3})


def test_unknown_fields_are_kept_and_sent_back() -> None:
    data = {
        "id": "abc",
        "state": "started",
        "brand_new_field": {"x": 1},
        "config": {"image": "i", "future_knob": True, "guest": {"cpus": 2, "gpu_model": "z"}},
    }
    machine = m.Machine.model_validate(data)
    assert machine.model_extra == {"brand_new_field": {"x": 1}}
    assert machine.to_wire() == data


@pytest.mark.parametrize("state", ["hibernating", "", "STARTED"])
def test_unknown_states_are_tolerated(state: str) -> None:
    machine = m.Machine.model_validate({"id": "abc", "state": state})
    assert machine.state == state
    assert state not in m.KNOWN_STATES


def test_known_states_cover_the_documented_lifecycle() -> None:
    for state in (
        "creating",
        "created",
        "started",
        "stopped",
        "suspended",
        "destroyed",
        "replacing",
    ):
        assert state in m.KNOWN_STATES


def test_machine_requires_an_id() -> None:
    with pytest.raises(ValidationError):
        m.Machine.model_validate({"state": "started"})


def test_wire_form_leaves_out_unset_fields() -> None:
    request = m.CreateMachineRequest(
        name="fn-1",
        config=m.MachineConfig(
            image="img",
            guest=m.MachineGuest(cpu_kind="shared", cpus=1, memory_mb=256),
            services=[m.MachineService(internal_port=8000, autostop=True)],
        ),
    )
    assert request.to_wire() == {
        "name": "fn-1",
        "config": {
            "image": "img",
            "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
            "services": [{"internal_port": 8000, "autostop": "stop"}],
        },
    }


def test_create_request_needs_a_config() -> None:
    with pytest.raises(ValidationError):
        m.CreateMachineRequest.model_validate({"name": "x"})


def test_update_request_carries_current_version() -> None:
    request = m.UpdateMachineRequest(config=m.MachineConfig(image="i"), current_version="v1")
    assert request.to_wire() == {"config": {"image": "i"}, "current_version": "v1"}


def test_stop_request_duration_from_int_nanoseconds() -> None:
    assert m.StopRequest.model_validate({"timeout": 2_000_000_000}).timeout == "2s"
    assert m.StopRequest.model_validate({"timeout": 90_000_000_000}).timeout == "90s"
    assert m.StopRequest.model_validate({"timeout": 120_000_000_000}).timeout == "2m"


def test_response_models_parse_spec_shapes() -> None:
    wait = m.WaitMachineResponse.model_validate(
        {"ok": True, "state": "started", "version": "v", "event_id": "e"}
    )
    assert wait.ok is True
    lease = m.Lease.model_validate(
        {"nonce": "n", "expires_at": 1, "owner": "o", "description": "d", "version": "v"}
    )
    assert lease.nonce == "n"
    err = m.ErrorResponse.model_validate({"error": "no", "status": "insufficient_capacity"})
    assert err.status == "insufficient_capacity"
    start = m.StartMachineResponse.model_validate(
        {"previous_state": "stopped", "migrated": False, "new_host": ""}
    )
    assert start.previous_state == "stopped"


# Our model for each spec schema: every property the newest spec defines must be a declared field,
# with the same name (so typed access works, and a renamed field is noticed).
SPEC_MODELS: dict[str, type[BaseModel]] = {
    "Machine": m.Machine,
    "MachineEvent": m.MachineEvent,
    "ImageRef": m.ImageRef,
    "CheckStatus": m.CheckStatus,
    "Lease": m.Lease,
    "StrippedLease": m.StrippedLease,
    "CreateLeaseRequest": m.CreateLeaseRequest,
    "CreateMachineRequest": m.CreateMachineRequest,
    "UpdateMachineRequest": m.UpdateMachineRequest,
    "StopRequest": m.StopRequest,
    "WaitMachineResponse": m.WaitMachineResponse,
    "ErrorResponse": m.ErrorResponse,
    "metadataValueResponse": m.MetadataValue,
    "fly.MachineConfig": m.MachineConfig,
    "fly.MachineGuest": m.MachineGuest,
    "fly.MachinePort": m.MachinePort,
    "fly.MachineService": m.MachineService,
    "fly.MachineServiceConcurrency": m.MachineServiceConcurrency,
    "fly.MachineServiceCheck": m.MachineServiceCheck,
    "fly.MachineCheck": m.MachineCheck,
    "fly.MachineRestart": m.MachineRestart,
    "fly.StopConfig": m.StopConfig,
    "fly.MachineInit": m.MachineInit,
    "fly.MachineProcess": m.MachineProcess,
    "fly.MachineHTTPHeader": m.MachineHTTPHeader,
}


@pytest.fixture(scope="module")
def newest_schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = json.loads(NEWEST_SPEC.read_text())["components"]["schemas"]
    return schemas


@pytest.mark.parametrize("schema_name", sorted(SPEC_MODELS))
def test_model_declares_every_spec_property(
    newest_schemas: dict[str, Any], schema_name: str
) -> None:
    spec_props = set(newest_schemas[schema_name].get("properties", {}))
    model = SPEC_MODELS[schema_name]
    # MachineMount etc. are declared partially on purpose; these models cover their schema fully.
    missing = spec_props - set(model.model_fields)
    assert not missing, f"{model.__name__} lacks spec properties {sorted(missing)}"


def test_old_yaml_spec_enum_values_parse_as_autostop() -> None:
    """The OpenAPI 3 YAML reads the `off` enum value as a boolean: that value must parse."""
    path = FLY_SPEC_DIR / "machines-openapi3.yml"
    schemas = yaml.safe_load(path.read_text())["components"]["schemas"]
    for value in schemas["fly.MachineService"]["properties"]["autostop"]["enum"]:
        assert m.MachineService.model_validate({"autostop": value}).autostop in m.AUTOSTOP_MODES
