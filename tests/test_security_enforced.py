"""Issue 23: what the system checks flyfn.E010 and flyfn.E011 report is refused at runtime too
(uvicorn and gunicorn never run checks), by the same rule and with the same words."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest
from django.test import override_settings

from flyfn.checks import check_settings
from flyfn.conf import load_settings, reset_settings
from flyfn.fly.api_host import in_clear
from flyfn.machines import AsyncMachinesClient, InsecureApiHostError
from flyfn.pool.manager import PoolManager
from flyfn.pool.spec import PoolConfigError, new_client, spec_for
from flyfn.secret_env import secret_like_env, secret_like_name, secret_like_value

TOKEN = "FlyV1 fm2_never-shown"
BASE = {"APP_NAME": "shop", "API_TOKEN": TOKEN, "IMAGE_REF": "registry.fly.io/shop:1"}


@pytest.fixture(autouse=True)
def _no_fly_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("FLY_APP_NAME", "FLY_API_HOSTNAME", "FLY_API_TOKEN", "FLY_IMAGE_REF"):
        monkeypatch.delenv(name, raising=False)
    reset_settings()
    yield
    reset_settings()


# ------------------------------------------------------------------------- E010: secrets in env


@pytest.mark.parametrize(
    "name",
    [
        "SLACK_WEBHOOK_URL",
        "DISCORD_WEBHOOK",
        "GITHUB_PAT",
        "PAT_GITHUB",
        "ADMIN_COOKIE",
        "SESSION_COOKIES",
        "HASHIDS_SALT",
        "SALT",
        "API_BEARER",
        "BEARER",
        "POSTGRES_URL",
        "POSTGRESQL_URL",
        "MYSQL_URL",
        "MONGODB_URI",
        "REPLICA_DATABASE_URL",
        "UPSTASH_REDIS_URL",
        "DB_CONNECTION_STRING",
    ],
)
def test_more_secret_names(name: str) -> None:
    assert secret_like_name(name)
    with override_settings(FLYFN={"GROUPS": {"pdf": {"env": [name]}}}):
        (message,) = check_settings()
    assert message.id == "flyfn.E010"


@pytest.mark.parametrize(
    "name",
    [
        "PATH",
        "PATTERN",
        "SESSION_COOKIE_NAME",
        "CSRF_COOKIE_SECURE",
        "WEBHOOK_TIMEOUT",
        "SALTSTACK_MASTER",
        "STATIC_URL",
        "SITE_URL",
        "LOG_LEVEL",
    ],
)
def test_names_that_only_look_close_are_fine(name: str) -> None:
    assert not secret_like_name(name)


@pytest.mark.parametrize(
    "value",
    [
        "postgres://db.internal:5432/app?user=app&password=hunter2",
        "postgresql://db/app?sslmode=require&sslpassword=hunter2",
        "host=db.internal dbname=app user=app password=hunter2",
        "redis://default:hunter2@cache.internal:6379",
        "https://bucket.s3.amazonaws.com/x?X-Amz-Signature=abc123",
        "https://api.example.com/feed?api_key=abc123",
        "https://hooks.slack.com/services/T000/B000/XXXXXXXX",
        "https://discord.com/api/webhooks/1/abc",
        "FlyV1 fm2_lJPECAAAAAAAA",
        "ghp_0123456789abcdefABCDEF0123456789abcd",
        "github_pat_11AAAAAAA0_abc",
        "xoxb-1234-5678-abcdef",
        "sk_live_0123456789",
        "AKIAIOSFODNN7EXAMPLE",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
    ],
)
def test_values_that_carry_credentials(value: str) -> None:
    assert secret_like_value(value)
    assert secret_like_env(["PRIMARY"], {"PRIMARY": value}) == ["PRIMARY"]


@pytest.mark.parametrize(
    "value",
    [
        "postgres://db.internal:5432/app?sslmode=require",
        "mongodb://db.internal/app?authSource=admin",
        "https://example.com/search?design=blue&page=2",
        "https://example.com/a:b@c",
        "info",
        "example.com,.fly.dev",
        "",
    ],
)
def test_values_without_credentials(value: str) -> None:
    assert not secret_like_value(value)


def test_a_password_in_a_query_string_is_e010_and_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PRIMARY", "postgres://db.internal/app?password=hunter2-not-shown")
    with override_settings(FLYFN={"GROUPS": {"pdf": {"env": ["PRIMARY"]}}}):
        (message,) = check_settings()
    assert message.id == "flyfn.E010"
    assert "hunter2" not in f"{message.msg} {message.hint}"


def test_the_pool_spec_refuses_what_e010_reports_with_its_words(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLACK_WEBHOOK_URL", "https://hooks.slack.com/services/T/B/not-shown")
    flyfn = {**BASE, "GROUPS": {"pdf": {"env": ["LOG_LEVEL", "SLACK_WEBHOOK_URL"]}}}
    with override_settings(FLYFN=flyfn):
        (message,) = check_settings()
        settings = load_settings(flyfn, environ={})
        with pytest.raises(PoolConfigError) as raised:
            spec_for(settings, "pdf")
    assert str(raised.value) == message.msg
    assert "not-shown" not in str(raised.value)


def test_the_pool_spec_reads_values_from_the_environment_it_is_given() -> None:
    flyfn = {**BASE, "GROUPS": {"pdf": {"env": ["PRIMARY"]}}}
    settings = load_settings(flyfn, environ={})
    with pytest.raises(PoolConfigError, match="'PRIMARY'"):
        spec_for(settings, "pdf", {"PRIMARY": "redis://:pw@cache"})
    env = spec_for(settings, "pdf", {"PRIMARY": "redis://cache"}).config.env
    assert env is not None
    assert env["PRIMARY"] == "redis://cache"


def test_silencing_e010_lets_the_pool_forward_the_variable() -> None:
    flyfn = {**BASE, "GROUPS": {"pdf": {"env": ["STRIPE_PUBLISHABLE_KEY"]}}}
    settings = load_settings(flyfn, environ={})
    environ = {"STRIPE_PUBLISHABLE_KEY": "pk_live_public"}
    with pytest.raises(PoolConfigError):
        spec_for(settings, "pdf", environ)
    with override_settings(SILENCED_SYSTEM_CHECKS=["flyfn.E010"]):
        env = spec_for(settings, "pdf", environ).config.env
    assert env is not None
    assert env["STRIPE_PUBLISHABLE_KEY"] == "pk_live_public"


def test_a_refused_group_falls_back_and_says_why(
    pool_manager: PoolManager, caplog: pytest.LogCaptureFixture
) -> None:
    flyfn = {**BASE, "GROUPS": {"pdf": {"env": ["GITHUB_PAT"]}}}
    with override_settings(FLYFN=flyfn), caplog.at_level(logging.ERROR, "flyfn.pool"):
        assert pool_manager.wait_target("pdf", 30) is None
    assert """FLYFN["GROUPS"]["pdf"]["env"] lists 'GITHUB_PAT'""" in caplog.text


# ------------------------------------------------------------------ E011: the token in clear


@pytest.mark.parametrize(
    ("url", "clear"),
    [
        ("http://api.machines.dev", True),
        ("HTTP://api.machines.dev", True),
        ("http://emulator.localhost:4280", True),
        ("http://10.0.0.5:4280", True),
        ("https://api.machines.dev", False),
        ("http://_api.internal:4280", False),
        ("http://localhost:4280", False),
        ("http://127.0.0.1:4280", False),
        ("http://[::1]:4280", False),
    ],
)
def test_one_rule_decides_clear_text(url: str, clear: bool) -> None:
    assert in_clear(url) is clear


@pytest.mark.parametrize("url", ["http://api.machines.dev", "http://emulator.localhost:4280"])
def test_e011_for_a_localhost_subdomain_and_a_public_host(url: str) -> None:
    with override_settings(FLYFN={"API_HOSTNAME": url}):
        (message,) = check_settings()
    assert message.id == "flyfn.E011"
    assert url in message.msg


@pytest.mark.parametrize("url", ["http://api.machines.dev", "http://machines.localhost:4280"])
def test_the_client_refuses_a_host_that_would_get_the_token_in_clear(url: str) -> None:
    with pytest.raises(InsecureApiHostError) as raised:
        AsyncMachinesClient("shop", api_token=TOKEN, api_hostname=url)
    assert url in str(raised.value)
    assert "https://" in str(raised.value)
    assert "fm2_" not in str(raised.value)
    with pytest.raises(InsecureApiHostError):  # httpx's network transport is the same
        AsyncMachinesClient(
            "shop", api_token=TOKEN, api_hostname=url, transport=httpx.AsyncHTTPTransport()
        )


def test_the_client_refuses_it_from_the_environment_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLY_API_HOSTNAME", "http://api.machines.dev")
    with pytest.raises(InsecureApiHostError):
        AsyncMachinesClient("shop", api_token=TOKEN)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.machines.dev",
        "http://_api.internal:4280",
        "http://127.0.0.1:4280",
        "http://localhost:4280",
        "_api.internal:4280",  # a bare private host gets http
    ],
)
async def test_the_client_accepts_https_flys_network_and_loopback(url: str) -> None:
    async with AsyncMachinesClient("shop", api_token=TOKEN, api_hostname=url):
        pass


async def test_an_in_process_transport_sends_nothing_over_a_network() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=[]))
    async with AsyncMachinesClient(
        "shop", api_token=TOKEN, api_hostname="http://machines.emulator", transport=transport
    ) as client:
        assert await client.list_machines() == []


def test_new_client_gives_the_checks_words_as_a_pool_config_error() -> None:
    flyfn = {**BASE, "API_HOSTNAME": "http://api.machines.dev"}
    with override_settings(FLYFN=flyfn):
        (message,) = check_settings()
    with pytest.raises(PoolConfigError) as raised:
        new_client(load_settings(flyfn, environ={}))
    assert f"{raised.value}." == message.msg
    assert "fm2_" not in str(raised.value)


def test_a_pool_with_a_clear_text_api_falls_back_and_says_why(
    pool_manager: PoolManager, caplog: pytest.LogCaptureFixture
) -> None:
    flyfn = {**BASE, "API_HOSTNAME": "http://api.machines.dev"}
    with override_settings(FLYFN=flyfn), caplog.at_level(logging.ERROR, "flyfn.pool"):
        assert pool_manager.wait_target("default", 30) is None
    assert "would travel in clear text" in caplog.text
    assert "fm2_" not in caplog.text
