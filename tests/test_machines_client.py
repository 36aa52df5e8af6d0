"""Tests of AsyncMachinesClient requests: config precedence, paths, params, bodies, pages."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from flyfn.machines import (
    DEFAULT_API_HOSTNAME,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    MAX_WAIT_TIMEOUT,
    AsyncMachinesClient,
    CreateMachineRequest,
    InvalidResponseError,
    MachineConfig,
    MachinesClientConfig,
    UpdateMachineRequest,
)

TOKEN = "FlyV1 fm2_sekrit-token-value"

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that records requests and answers with a route function."""

    def __init__(self, route: Handler | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.route = route or (lambda request: httpx.Response(200, json={"id": "m1"}))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.route(request)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


def make_client(recorder: Recorder, **kwargs: Any) -> AsyncMachinesClient:
    kwargs.setdefault("api_token", TOKEN)
    return AsyncMachinesClient(
        kwargs.pop("app_name", "shop"), transport=httpx.MockTransport(recorder), **kwargs
    )


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("FLY_API_HOSTNAME", "FLY_API_TOKEN", "FLY_APP_NAME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# -- configuration ------------------------------------------------------------------------------


def test_defaults_without_env(clean_env: pytest.MonkeyPatch) -> None:
    config = MachinesClientConfig.resolve()
    assert config.api_hostname == DEFAULT_API_HOSTNAME
    assert config.app_name is None
    assert config.api_token is None
    assert config.timeout == DEFAULT_TIMEOUT
    assert config.max_retries == DEFAULT_MAX_RETRIES


def test_env_used_when_no_argument(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLY_API_HOSTNAME", "http://_api.internal:4280")
    clean_env.setenv("FLY_API_TOKEN", "env-token")
    clean_env.setenv("FLY_APP_NAME", "env-app")
    config = AsyncMachinesClient().config
    assert (config.api_hostname, config.api_token, config.app_name) == (
        "http://_api.internal:4280",
        "env-token",
        "env-app",
    )


def test_argument_beats_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLY_API_HOSTNAME", "http://_api.internal:4280")
    clean_env.setenv("FLY_API_TOKEN", "env-token")
    clean_env.setenv("FLY_APP_NAME", "env-app")
    config = AsyncMachinesClient(
        "arg-app", api_token="arg-token", api_hostname="http://127.0.0.1:9/"
    ).config
    assert (config.api_hostname, config.api_token, config.app_name) == (
        "http://127.0.0.1:9",
        "arg-token",
        "arg-app",
    )


def test_empty_env_values_count_as_unset(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLY_API_HOSTNAME", "")
    clean_env.setenv("FLY_API_TOKEN", "")
    config = MachinesClientConfig.resolve()
    assert config.api_hostname == DEFAULT_API_HOSTNAME
    assert config.api_token is None


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("_api.internal:4280", "http://_api.internal:4280"),
        ("127.0.0.1:4280", "http://127.0.0.1:4280"),
        ("api.machines.dev", "https://api.machines.dev"),
        ("https://api.machines.dev/", "https://api.machines.dev"),
    ],
)
def test_hostname_gets_a_scheme(given: str, expected: str) -> None:
    assert MachinesClientConfig.resolve(api_hostname=given).api_hostname == expected


def test_timeout_and_retries_overridable_per_client() -> None:
    config = MachinesClientConfig.resolve(timeout=3.0, max_retries=0)
    assert config.timeout == httpx.Timeout(3.0)
    assert config.max_retries == 0
    with pytest.raises(ValueError, match="max_retries"):
        MachinesClientConfig.resolve(max_retries=-1)


def test_token_never_in_repr_or_str_of_client_or_config() -> None:
    client = AsyncMachinesClient("shop", api_token=TOKEN)
    for text in (repr(client), str(client), repr(client.config), str(client.config)):
        assert TOKEN not in text
        assert "sekrit" not in text
    assert "token=set" in repr(client)


async def test_token_sent_as_bearer_and_missing_token_sends_no_header(
    clean_env: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder()
    async with make_client(recorder) as client:
        await client.get_machine("m1")
    assert recorder.last.headers["authorization"] == f"Bearer {TOKEN}"
    async with make_client(recorder, api_token=None) as client:
        await client.get_machine("m1")
    assert "authorization" not in recorder.last.headers


async def test_context_manager_closes_the_pool() -> None:
    client = make_client(Recorder())
    async with client as entered:
        assert entered is client
        assert not client.is_closed
    assert client.is_closed


async def test_missing_app_name_is_a_clear_error(clean_env: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    async with AsyncMachinesClient(transport=httpx.MockTransport(recorder)) as client:
        with pytest.raises(ValueError, match="FLY_APP_NAME"):
            await client.list_machines()
        await client.get_machine("m1", app="other")
    assert recorder.requests[0].url.path == "/v1/apps/other/machines/m1"


async def test_token_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    recorder = Recorder(lambda r: httpx.Response(503, json={"error": "down"}))
    async with make_client(recorder) as client:

        async def no_sleep(_: float) -> None:
            return None

        client._sleep = no_sleep
        with pytest.raises(Exception, match="down"):
            await client.get_machine("m1")
    assert caplog.records, "expected the retries to be logged"
    assert all("sekrit" not in record.getMessage() for record in caplog.records)


# -- operations: paths, params, bodies --------------------------------------------------------


async def test_list_filters_become_query_params() -> None:
    recorder = Recorder(lambda r: httpx.Response(200, json=[]))
    async with make_client(recorder) as client:
        result = await client.list_machines(
            metadata={"fly_role": "flyfn", "flyfn_group": "pdf"},
            region="ams",
            state=["started", "stopped"],
            include_deleted=True,
            summary=True,
            page_size=50,
        )
    assert result == []
    request = recorder.last
    assert request.method == "GET"
    assert request.url.path == "/v1/apps/shop/machines"
    assert dict(request.url.params) == {
        "metadata.fly_role": "flyfn",
        "metadata.flyfn_group": "pdf",
        "region": "ams",
        "state": "started,stopped",
        "include_deleted": "true",
        "summary": "true",
        "limit": "50",
    }


async def test_list_without_filters_sends_no_params() -> None:
    recorder = Recorder(lambda r: httpx.Response(200, json=[{"id": "a"}]))
    async with make_client(recorder) as client:
        machines = await client.list_machines(state="started")
    assert [m.id for m in machines] == ["a"]
    assert dict(recorder.last.url.params) == {"state": "started"}


async def test_list_follows_fly_next_cursor_pages() -> None:
    pages = {
        None: ([{"id": "a"}, {"id": "b"}], "cur-1"),
        "cur-1": ([{"id": "c"}, {"id": "d"}], "cur-2"),
        "cur-2": ([{"id": "e"}], None),
    }

    def route(request: httpx.Request) -> httpx.Response:
        body, next_cursor = pages[request.url.params.get("cursor")]
        headers = {"fly-next-cursor": next_cursor} if next_cursor else {}
        return httpx.Response(200, json=body, headers=headers)

    recorder = Recorder(route)
    async with make_client(recorder) as client:
        machines = await client.list_machines(metadata={"k": "v"}, page_size=2)
    assert [m.id for m in machines] == ["a", "b", "c", "d", "e"]
    assert [r.url.params.get("cursor") for r in recorder.requests] == [None, "cur-1", "cur-2"]
    # The filters and the page size are kept on every page.
    assert all(r.url.params["metadata.k"] == "v" for r in recorder.requests)
    assert all(r.url.params["limit"] == "2" for r in recorder.requests)


async def test_list_repeated_cursor_is_an_invalid_response_not_a_loop() -> None:
    recorder = Recorder(
        lambda r: httpx.Response(200, json=[{"id": "a"}], headers={"fly-next-cursor": "same"})
    )
    async with make_client(recorder) as client:
        with pytest.raises(InvalidResponseError, match="list_machines"):
            await client.list_machines()
    assert len(recorder.requests) == 2


async def test_list_rejects_bad_page_size() -> None:
    async with make_client(Recorder()) as client:
        with pytest.raises(ValueError, match="page_size"):
            await client.list_machines(page_size=0)


async def test_create_posts_the_wire_body() -> None:
    recorder = Recorder(lambda r: httpx.Response(200, json={"id": "new", "state": "created"}))
    request = CreateMachineRequest(
        name="fn-1", region="ams", config=MachineConfig(image="img", metadata={"a": "b"})
    )
    async with make_client(recorder) as client:
        machine = await client.create_machine(request)
    assert machine.id == "new"
    sent = recorder.last
    assert (sent.method, sent.url.path) == ("POST", "/v1/apps/shop/machines")
    assert json.loads(sent.content) == {
        "name": "fn-1",
        "region": "ams",
        "config": {"image": "img", "metadata": {"a": "b"}},
    }


async def test_update_sends_lease_nonce_header_only_when_given() -> None:
    recorder = Recorder()
    request = UpdateMachineRequest(config=MachineConfig(image="img2"), current_version="v1")
    async with make_client(recorder) as client:
        await client.update_machine("m1", request, lease_nonce="nonce-1")
        assert recorder.last.headers["fly-machine-lease-nonce"] == "nonce-1"
        await client.update_machine("m1", request)
        assert "fly-machine-lease-nonce" not in recorder.last.headers
    assert (recorder.last.method, recorder.last.url.path) == ("POST", "/v1/apps/shop/machines/m1")
    assert json.loads(recorder.last.content) == {
        "config": {"image": "img2"},
        "current_version": "v1",
    }


async def test_start_parses_body_or_tolerates_empty_body() -> None:
    bodies = iter([httpx.Response(200, json={"previous_state": "stopped"}), httpx.Response(200)])
    recorder = Recorder(lambda r: next(bodies))
    async with make_client(recorder) as client:
        first = await client.start_machine("m1")
        second = await client.start_machine("m1")
    assert first.previous_state == "stopped"
    assert second.previous_state is None
    assert recorder.last.url.path == "/v1/apps/shop/machines/m1/start"


async def test_stop_sends_signal_and_timeout() -> None:
    recorder = Recorder(lambda r: httpx.Response(200, json={"ok": True}))
    async with make_client(recorder) as client:
        await client.stop_machine("m1", signal="SIGINT", stop_timeout="30s")
        assert json.loads(recorder.last.content) == {"signal": "SIGINT", "timeout": "30s"}
        await client.stop_machine("m1")
        assert json.loads(recorder.last.content) == {}
        await client.suspend_machine("m1")
    paths = [r.url.path.rsplit("/", 1)[-1] for r in recorder.requests]
    assert paths == ["stop", "stop", "suspend"]


async def test_wait_caps_timeout_and_passes_version() -> None:
    recorder = Recorder(lambda r: httpx.Response(200, json={"ok": True, "state": "stopped"}))
    async with make_client(recorder) as client:
        result = await client.wait_machine("m1", state="stopped", wait_timeout=300, version="v9")
        assert result.state == "stopped"
        assert dict(recorder.last.url.params) == {
            "state": "stopped",
            "timeout": str(MAX_WAIT_TIMEOUT),
            "version": "v9",
        }
        await client.wait_machine("m1", wait_timeout=2.2, instance_id="i1")
        assert dict(recorder.last.url.params) == {
            "state": "started",
            "timeout": "3",
            "instance_id": "i1",
        }
    # The HTTP read timeout outlasts the server-side wait.
    assert recorder.last.extensions["timeout"]["read"] > 3


async def test_destroy_force_flag() -> None:
    recorder = Recorder(lambda r: httpx.Response(200, json={"ok": True}))
    async with make_client(recorder) as client:
        await client.destroy_machine("m1", force=True)
        assert dict(recorder.last.url.params) == {"force": "true"}
        await client.destroy_machine("m1")
        assert dict(recorder.last.url.params) == {}
    assert recorder.last.method == "DELETE"
    assert recorder.last.url.path == "/v1/apps/shop/machines/m1"


async def test_lease_acquire_refresh_release() -> None:
    def route(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(201, json={"nonce": "n1", "expires_at": 99, "owner": "me"})
        return httpx.Response(200, json={"ok": True})

    recorder = Recorder(route)
    async with make_client(recorder) as client:
        lease = await client.acquire_lease("m1", ttl=30, description="flyfn update")
        refreshed = await client.refresh_lease("m1", nonce="n1", ttl=60)
        await client.release_lease("m1", nonce="n1")
    assert lease.nonce == refreshed.nonce == "n1"
    acquire, refresh, release = recorder.requests
    assert json.loads(acquire.content) == {"ttl": 30, "description": "flyfn update"}
    assert "fly-machine-lease-nonce" not in acquire.headers
    assert json.loads(refresh.content) == {"ttl": 60}
    assert refresh.headers["fly-machine-lease-nonce"] == "n1"
    assert (release.method, release.headers["fly-machine-lease-nonce"]) == ("DELETE", "n1")
    assert {r.url.path for r in recorder.requests} == {"/v1/apps/shop/machines/m1/lease"}


async def test_metadata_get_set_delete() -> None:
    def route(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"fly_role": "flyfn"})
        return httpx.Response(204)

    recorder = Recorder(route)
    async with make_client(recorder) as client:
        assert await client.get_metadata("m1") == {"fly_role": "flyfn"}
        await client.set_metadata("m1", "flyfn/group", "pdf")
        await client.delete_metadata("m1", "flyfn_group")
    get, set_, delete = recorder.requests
    assert get.url.path == "/v1/apps/shop/machines/m1/metadata"
    # The key is one path segment even when it contains a slash.
    assert set_.url.raw_path == b"/v1/apps/shop/machines/m1/metadata/flyfn%2Fgroup"
    assert json.loads(set_.content) == {"value": "pdf"}
    assert (delete.method, delete.url.path) == (
        "DELETE",
        "/v1/apps/shop/machines/m1/metadata/flyfn_group",
    )


async def test_metadata_null_body_is_empty_dict() -> None:
    recorder = Recorder(lambda r: httpx.Response(200, content=b"null"))
    async with make_client(recorder) as client:
        assert await client.get_metadata("m1") == {}


async def test_app_override_per_call() -> None:
    recorder = Recorder(lambda r: httpx.Response(200, json=[]))
    async with make_client(recorder) as client:
        await client.list_machines(app="shop-fn")
    assert recorder.last.url.path == "/v1/apps/shop-fn/machines"


async def test_per_call_timeout_reaches_httpx() -> None:
    recorder = Recorder()
    async with make_client(recorder, timeout=7.0) as client:
        await client.get_machine("m1")
        assert recorder.last.extensions["timeout"]["read"] == 7.0
        await client.get_machine("m1", timeout=1.5)
        assert recorder.last.extensions["timeout"]["read"] == 1.5
