"""Contract tests against Fly's official Machines API spec (`tests/fly_spec/`, see its README).

* Every request the AsyncMachinesClient sends (driven through every operation it has) goes to a
  path and method of the newest spec, with declared query parameters and a body valid against the
  operation's request schema.
* Every response the emulator returns to them (and to a few raw requests) has a status the spec
  lists for 2xx, and a body valid against that status's schema (errors against ErrorResponse).
* The models accept the shapes of all three stored specs: a sample instance of each schema, filled
  with every property, parses and is sent back in a shape valid against the newest spec.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import yaml
from openapi_schema_validator import OAS30Validator
from pydantic import BaseModel

from flyfn.emulator.api import MachinesEmulator, create_app
from flyfn.machines import models
from flyfn.machines.client import AsyncMachinesClient
from flyfn.machines.errors import MachinesStatusError
from tests.support_machines_api import EMULATOR_APP, EMULATOR_BASE_URL, EMULATOR_TOKEN, FLY_SPEC_DIR

NEWEST = "machines-openapi-newest.json"
OLDER = ("machines-openapi3.yml", "machines-openapi.json")
IMAGE = "registry.fly.io/testapp:deployment-01"

# -- the spec --------------------------------------------------------------------------------------


@functools.cache
def load_spec(name: str) -> dict[str, Any]:
    path = FLY_SPEC_DIR / name
    text = path.read_text(encoding="utf-8")
    loaded = yaml.safe_load(text) if path.suffix in (".yml", ".yaml") else json.loads(text)
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return load_spec(NEWEST)


def schema_validator(spec: dict[str, Any], schema: dict[str, Any]) -> OAS30Validator:
    """A validator of `schema` whose `#/components/...` refs resolve into the spec."""
    return OAS30Validator({**schema, "components": spec["components"]})


def schema_errors(
    spec: dict[str, Any], schema: dict[str, Any], instance: Any, *, enums: bool = True
) -> list[str]:
    """Why `instance` is invalid (empty when valid); `enums=False` checks types and shapes only."""
    validator = schema_validator(spec, schema)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(instance)
        if (enums or e.validator != "enum") and not _unsatisfiable(spec, e.schema)
    ]


def _unsatisfiable(spec: dict[str, Any], schema: Any) -> bool:
    # The generated spec has `{"type": "object", "allOf": [<a string enum>]}` (containers'
    # condition/kind/scheme): no value can match both, so those errors say nothing about us.
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return False
    parts = schema.get("allOf") or []
    return any(
        "$ref" in part and _resolve(spec, part["$ref"]).get("type") not in (None, "object")
        for part in parts
    )


def match_path(spec: dict[str, Any], path: str) -> str | None:
    """The spec's path template matching a concrete path (literal segments preferred)."""
    candidates: list[str] = []
    for template in spec["paths"]:
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            candidates.append(template)
    if not candidates:
        return None
    return min(candidates, key=lambda t: t.count("{"))


def json_schema_of(content: dict[str, Any] | None) -> dict[str, Any] | None:
    if not content:
        return None
    media = content.get("application/json")
    return media.get("schema") if media else None


# -- recording every exchange ----------------------------------------------------------------------


@dataclass
class Exchange:
    method: str
    path: str
    query: list[tuple[str, str]]
    request_body: bytes
    status: int
    response_body: bytes

    def __str__(self) -> str:
        return f"{self.method} {self.path} -> {self.status}"


class RecordingTransport(httpx.AsyncBaseTransport):
    """Passes requests to `inner` and keeps every request and response body."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.exchanges: list[Exchange] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request_body = await request.aread()
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        self.exchanges.append(
            Exchange(
                method=request.method,
                path=request.url.path,
                query=list(request.url.params.multi_items()),
                request_body=request_body,
                status=response.status_code,
                response_body=body,
            )
        )
        return httpx.Response(
            response.status_code, headers=response.headers, content=body, request=request
        )


class Tracked:
    """Forwards to the client, noting which of its public methods were used."""

    def __init__(self, client: AsyncMachinesClient) -> None:
        self._client = client
        self.used: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_"):
            self.used.add(name)
        return getattr(self._client, name)


# The client's coroutines that call no API: closing it, and a caller's wait after a 429.
_NOT_API_CALLS = frozenset({"aclose", "wait_retry_after"})


def client_operations() -> set[str]:
    return {
        name
        for name, member in inspect.getmembers(AsyncMachinesClient, inspect.iscoroutinefunction)
        if not name.startswith("_") and name not in _NOT_API_CALLS
    }


async def _expect_status(status: int, coro: Any) -> None:
    with pytest.raises(MachinesStatusError) as caught:
        await coro
    assert caught.value.status == status


async def drive_every_operation(client: Tracked, raw: httpx.AsyncClient) -> None:
    """Call every client operation (successes and the API's refusals) and a few raw requests."""
    req = models.CreateMachineRequest(
        name="fn-pdf-1",
        region="local",
        config=models.MachineConfig(
            image=IMAGE,
            env={"FLYFN_GROUP": "pdf"},
            metadata={"flyfn_group": "pdf"},
            guest=models.MachineGuest(cpu_kind="shared", cpus=1, memory_mb=512),
            services=[
                models.MachineService(
                    protocol="tcp",
                    internal_port=8000,
                    autostart=True,
                    autostop=True,  # the old boolean form, sent as "stop"
                    min_machines_running=0,
                    ports=[
                        models.MachinePort(port=80, handlers=["http"], force_https=True),
                        models.MachinePort(port=443, handlers=["tls", "http"]),
                    ],
                    concurrency=models.MachineServiceConcurrency(
                        type="requests", soft_limit=20, hard_limit=25
                    ),
                )
            ],
            restart=models.MachineRestart(policy="on-failure", max_retries=3),
            stop_config=models.StopConfig(signal="SIGTERM", timeout="10s"),
            auto_destroy=False,
        ),
    )
    machine = await client.create_machine(req)
    await client.wait_machine(machine.id, state="started", wait_timeout=5)
    await client.list_machines(metadata={"flyfn_group": "pdf"}, region="local", state="started")
    await client.list_machines(include_deleted=True, summary=True, page_size=1)
    await client.list_machines(include_leases=True, state=["started", "stopped"])
    await client.get_machine(machine.id)
    await client.stop_machine(machine.id, signal="SIGTERM", stop_timeout="5s")
    await client.wait_machine(machine.id, state="stopped", wait_timeout=5, version=machine.version)
    await client.start_machine(machine.id)
    await client.wait_machine(machine.id, state="started", wait_timeout=5)
    await client.suspend_machine(machine.id)
    await client.wait_machine(machine.id, state="suspended", wait_timeout=5)
    await client.start_machine(machine.id)
    await client.wait_machine(machine.id, state="started", wait_timeout=5)

    lease = await client.acquire_lease(machine.id, ttl=30, description="contract")
    assert lease.nonce is not None
    await _expect_status(409, client.acquire_lease(machine.id, ttl=30))
    update = models.UpdateMachineRequest(config=req.config, current_version=machine.version)
    await _expect_status(409, client.update_machine(machine.id, update))
    updated = await client.update_machine(machine.id, update, lease_nonce=lease.nonce)
    await client.refresh_lease(machine.id, nonce=lease.nonce, ttl=60)
    await client.release_lease(machine.id, nonce=lease.nonce)

    await client.set_metadata(machine.id, "owner", "pool")
    await client.get_metadata(machine.id)
    await client.delete_metadata(machine.id, "owner")

    await client.wait_machine(machine.id, state="started", wait_timeout=5)
    await _expect_status(412, client.destroy_machine(machine.id))
    await _expect_status(408, client.wait_machine(machine.id, state="stopped", wait_timeout=1))
    await _expect_status(404, client.get_machine("0123456789abcd"))
    await _expect_status(
        422, client.create_machine(models.CreateMachineRequest(config=models.MachineConfig()))
    )
    await _expect_status(409, client.create_machine(req))  # the name is taken
    await client.destroy_machine(machine.id, force=True)
    await client.wait_machine(machine.id, state="destroyed", wait_timeout=5)
    await client.list_machines(include_deleted=True)
    assert updated.version != machine.version

    # Raw requests for what the client does not ask in this form.
    other = await client.create_machine(
        models.CreateMachineRequest(config=req.config, lease_ttl=30)
    )
    base = f"/v1/apps/{EMULATOR_APP}/machines/{other.id}"
    for method, path, params in (
        ("GET", f"{base}/lease", None),
        ("GET", f"{base}/events", None),
        ("GET", f"{base}/metadata/flyfn_group", None),
        ("GET", f"{base}/metadata/missing", None),
        ("GET", base, {"include_leases": "true"}),
        ("POST", f"{base}/stop", None),
    ):
        await raw.request(method, path, params=params)
    await raw.post(f"/v1/apps/{EMULATOR_APP}/machines", content=b"{oops")


async def _record_scenario() -> tuple[list[Exchange], set[str]]:
    emulator = MachinesEmulator(default_app=EMULATOR_APP)
    transport = RecordingTransport(
        # A focused test of shapes: one scenario of every operation, beyond Fly's rate limits.
        httpx.ASGITransport(app=create_app(emulator, token=EMULATOR_TOKEN, rate_limit=None))
    )
    try:
        async with (
            AsyncMachinesClient(
                EMULATOR_APP, api_token=EMULATOR_TOKEN, api_hostname=EMULATOR_BASE_URL,
                transport=transport, max_retries=0,
            ) as client,
            AsyncMachinesClient(
                EMULATOR_APP, api_token="wrong", api_hostname=EMULATOR_BASE_URL,
                transport=transport, max_retries=0,
            ) as unauthorised,
            httpx.AsyncClient(
                transport=transport, base_url=EMULATOR_BASE_URL,
                headers={"Authorization": f"Bearer {EMULATOR_TOKEN}"},
            ) as raw,
        ):  # fmt: skip
            tracked = Tracked(client)
            await drive_every_operation(tracked, raw)
            await _expect_status(401, unauthorised.list_machines())
    finally:
        await emulator.aclose()
    return transport.exchanges, tracked.used


@pytest.fixture(scope="module")
def recorded() -> tuple[list[Exchange], set[str]]:
    """The exchanges of one run of the scenario, shared by the checks below."""
    return asyncio.run(_record_scenario())


# -- the contract tests ----------------------------------------------------------------------------


def test_the_scenario_uses_every_client_operation(
    recorded: tuple[list[Exchange], set[str]],
) -> None:
    _, used = recorded
    missing = client_operations() - used
    assert not missing, f"operations the contract scenario does not exercise: {sorted(missing)}"


def test_every_call_is_a_path_and_method_of_the_spec(
    spec: dict[str, Any], recorded: tuple[list[Exchange], set[str]]
) -> None:
    exchanges, _ = recorded
    assert len(exchanges) > 40
    for exchange in exchanges:
        template = match_path(spec, exchange.path)
        assert template is not None, f"{exchange}: path not in the spec"
        assert exchange.method.lower() in spec["paths"][template], f"{exchange}: method not in spec"


def test_every_query_parameter_is_declared(
    spec: dict[str, Any], recorded: tuple[list[Exchange], set[str]]
) -> None:
    exchanges, _ = recorded
    for exchange in exchanges:
        template = match_path(spec, exchange.path)
        assert template is not None
        operation = spec["paths"][template][exchange.method.lower()]
        declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
        for name, _ in exchange.query:
            ok = name in declared or (name.startswith("metadata.") and "metadata.{key}" in declared)
            assert ok, f"{exchange}: query parameter {name!r} is not in the spec"


def test_every_request_body_matches_the_spec(
    spec: dict[str, Any], recorded: tuple[list[Exchange], set[str]]
) -> None:
    exchanges, _ = recorded
    checked = 0
    for exchange in exchanges:
        template = match_path(spec, exchange.path)
        assert template is not None
        operation = spec["paths"][template][exchange.method.lower()]
        schema = json_schema_of(operation.get("requestBody", {}).get("content"))
        if exchange.request_body == b"{oops":
            continue  # the deliberately broken raw request
        if schema is None:
            assert not exchange.request_body.strip(), f"{exchange}: a body the spec does not take"
            continue
        if not exchange.request_body:
            continue  # optional bodies (e.g. stop without options)
        errors = schema_errors(spec, schema, json.loads(exchange.request_body))
        assert not errors, f"{exchange}: request body invalid: {errors}"
        checked += 1
    assert checked >= 8


def test_every_response_body_matches_the_spec(
    spec: dict[str, Any], recorded: tuple[list[Exchange], set[str]]
) -> None:
    exchanges, _ = recorded
    error_schema = {"$ref": "#/components/schemas/ErrorResponse"}
    statuses = set()
    for exchange in exchanges:
        template = match_path(spec, exchange.path)
        assert template is not None
        operation = spec["paths"][template][exchange.method.lower()]
        responses = operation.get("responses", {})
        statuses.add(exchange.status)
        listed = responses.get(str(exchange.status))
        if exchange.status < 400:
            assert listed is not None, f"{exchange}: a success status the spec does not list"
        if exchange.status == 204:
            assert exchange.response_body == b"", f"{exchange}: 204 with a body"
            continue
        body = json.loads(exchange.response_body)
        schema = json_schema_of(listed.get("content")) if listed else None
        if schema is None and exchange.status >= 400:
            schema = error_schema
        if exchange.status >= 400:
            assert isinstance(body.get("error"), str), f"{exchange}: no error text"
        if schema is not None:
            errors = schema_errors(spec, schema, body)
            assert not errors, f"{exchange}: response body invalid: {errors}"
    # The scenario reached the refusals too, not only the happy path.
    assert {200, 201, 204, 400, 401, 404, 408, 409, 412, 422} <= statuses


def test_create_answers_a_spec_machine_with_every_field_typed(
    spec: dict[str, Any], recorded: tuple[list[Exchange], set[str]]
) -> None:
    exchanges, _ = recorded
    create = next(e for e in exchanges if e.method == "POST" and e.path.endswith("/machines"))
    body = json.loads(create.response_body)
    assert not schema_errors(spec, {"$ref": "#/components/schemas/Machine"}, body)
    assert body["config"]["services"][0]["autostop"] == "stop"


# -- the models accept every spec's shapes ---------------------------------------------------------

# Spec schema name -> model (names shared by the three specs).
MODEL_FOR_SCHEMA: dict[str, type[BaseModel]] = {
    "Machine": models.Machine,
    "fly.MachineConfig": models.MachineConfig,
    "CreateMachineRequest": models.CreateMachineRequest,
    "UpdateMachineRequest": models.UpdateMachineRequest,
    "Lease": models.Lease,
    "CreateLeaseRequest": models.CreateLeaseRequest,
    "StopRequest": models.StopRequest,
    "WaitMachineResponse": models.WaitMachineResponse,
    "ErrorResponse": models.ErrorResponse,
    "MachineEvent": models.MachineEvent,
    "ImageRef": models.ImageRef,
    "fly.MachineService": models.MachineService,
    "fly.MachineGuest": models.MachineGuest,
    "fly.MachinePort": models.MachinePort,
    "fly.MachineRestart": models.MachineRestart,
    "fly.StopConfig": models.StopConfig,
    "fly.MachineServiceConcurrency": models.MachineServiceConcurrency,
}


def _schemas(document: dict[str, Any]) -> dict[str, Any]:
    if "definitions" in document:  # Swagger 2.0
        found: dict[str, Any] = document["definitions"]
    else:
        found = document["components"]["schemas"]
    return found


def _resolve(document: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    assert isinstance(node, dict)
    return node


_SKIP = object()


def sample(document: dict[str, Any], schema: dict[str, Any], refs: tuple[str, ...] = ()) -> Any:
    """An instance with every property of `schema` filled (refs followed, cycles left out)."""
    if "$ref" in schema:
        ref = schema["$ref"]
        if ref in refs:
            return _SKIP
        return sample(document, _resolve(document, ref), (*refs, ref))
    if "allOf" in schema:
        if len(schema["allOf"]) == 1:
            return sample(document, schema["allOf"][0], refs)
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            value = sample(document, part, refs)
            if isinstance(value, dict):
                merged.update(value)
        return merged
    if "enum" in schema:
        values = [v for v in schema["enum"] if not (isinstance(v, int) and abs(v) > 2**53)]
        if schema.get("type") == "string":
            # YAML 1.1 reads the yml spec's unquoted `no`/`off` as booleans: not API values.
            values = [v for v in values if isinstance(v, str)] or values
        return (values or schema["enum"])[0]
    kind = schema.get("type", "object" if "properties" in schema else None)
    if kind == "object":
        out = {k: sample(document, v, refs) for k, v in schema.get("properties", {}).items()}
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and not out:
            out["key"] = sample(document, extra, refs)
        return {k: v for k, v in out.items() if v is not _SKIP}
    if kind == "array":
        item = sample(document, schema.get("items", {}), refs)
        return [] if item is _SKIP else [item]
    return {"string": "x", "integer": 1, "number": 1.5, "boolean": True}.get(kind or "", {})


def _spec_schema_cases() -> Iterator[Any]:
    """Every (spec, schema) pair the spec has: the March 2024 Swagger file predates some schemas."""
    for name in (NEWEST, *OLDER):
        for schema_name in MODEL_FOR_SCHEMA:
            if schema_name in _schemas(load_spec(name)):
                yield pytest.param(name, schema_name, id=f"{name}:{schema_name}")


@pytest.mark.parametrize(("spec_name", "schema_name"), list(_spec_schema_cases()))
def test_every_specs_shapes_parse_and_leave_in_the_newest_shape(
    spec: dict[str, Any], spec_name: str, schema_name: str
) -> None:
    document = load_spec(spec_name)
    schema = _schemas(document)[schema_name]
    instance = sample(document, schema)
    if schema_name == "Machine":
        instance["id"] = instance.get("id") or "0123456789abcd"
    model = MODEL_FOR_SCHEMA[schema_name]
    parsed = model.model_validate(instance)
    wire = parsed.model_dump(mode="json", exclude_none=True)
    # Every property given came through (unknown ones are kept, never dropped).
    assert set(instance) <= set(wire) | {k for k, v in instance.items() if v is None}
    newest_schema = {"$ref": f"#/components/schemas/{schema_name}"}
    # An older spec's free strings (a signal "x") need not be in the newest spec's enums.
    errors = schema_errors(spec, newest_schema, wire, enums=spec_name == NEWEST)
    assert not errors, (
        f"{spec_name} {schema_name} re-sent in a shape the newest spec refuses: {errors}"
    )
