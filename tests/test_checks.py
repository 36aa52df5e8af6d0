"""flyfn.checks: every check id fires on its problem and stays quiet on a correct project."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.sessions.middleware import SessionMiddleware
from django.core.checks import CheckMessage
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.http import HttpRequest, HttpResponse
from django.test import override_settings
from django.views import View

from flyfn.checks import (
    MIDDLEWARE_PATH,
    check_machine_names,
    check_middleware,
    check_settings,
    check_views,
    secret_like_env,
)
from flyfn.conf import reset_settings
from flyfn.registry import registry

SECURITY = "django.middleware.security.SecurityMiddleware"
SESSIONS = "django.contrib.sessions.middleware.SessionMiddleware"
AUTH = "django.contrib.auth.middleware.AuthenticationMiddleware"
CSRF = "django.middleware.csrf.CsrfViewMiddleware"
COMMON = "django.middleware.common.CommonMiddleware"


class CustomSessionMiddleware(SessionMiddleware):
    """A project's own session middleware: still per-request I/O."""


@pytest.fixture(autouse=True)
def _no_fly_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("FLY_APP_NAME", "FLY_API_HOSTNAME", "FLY_API_TOKEN", "FLY_IMAGE_REF"):
        monkeypatch.delenv(name, raising=False)
    reset_settings()
    yield
    reset_settings()


def ids(messages: list[CheckMessage]) -> list[str]:
    return [m.id for m in messages if m.id is not None]


def run_all() -> list[CheckMessage]:
    return [*check_settings(), *check_views(), *check_middleware(), *check_machine_names()]


# --------------------------------------------------------------------------- a correct project


@override_settings(
    FLYFN={"VIEWS": {"top": ["GET"]}, "APP_NAME": "shop", "API_TOKEN": "tok"},
    ROOT_URLCONF="tests.test_registry",
    MIDDLEWARE=[SECURITY, MIDDLEWARE_PATH, SESSIONS, COMMON, CSRF, AUTH],
)
def test_a_correct_project_has_no_flyfn_messages() -> None:
    assert run_all() == []


# --------------------------------------------------------------------------- settings


def test_e001_invalid_value() -> None:
    with override_settings(FLYFN={"GROUPS": {"pdf": {"autostop": "sometimes"}}}):
        (message,) = check_settings()
    assert message.id == "flyfn.E001"
    assert message.msg == (
        'FLYFN["GROUPS"]["pdf"]["autostop"]: must be one of "stop", "suspend", "off" '
        '(got "sometimes")'
    )
    assert message.hint


@pytest.mark.parametrize(
    ("guest", "rule"),
    [
        ({"memory_mb": 4096}, "shared CPUs take 256-2048 MB each"),  # 1 shared CPU: 2048 at most
        ({"cpus": 2, "memory_mb": 256}, "(512-4096 MB here)"),
        ({"cpu_kind": "performance", "memory_mb": 1024}, "performance CPUs take 2048-8192 MB"),
        ({"cpu_kind": "performance", "cpus": 2, "memory_mb": 32768}, "(4096-16384 MB here)"),
        # Performance memory comes in 1024 MB steps.
        ({"cpu_kind": "performance", "memory_mb": 2304}, "MB each, in multiples of 1024"),
        ({"cpu_kind": "performance", "cpus": 2, "memory_mb": 4352}, "in multiples of 1024"),
    ],
)
def test_e001_guest_size_fly_refuses(guest: dict[str, Any], rule: str) -> None:
    with override_settings(FLYFN={"GROUPS": {"pdf": {"guest": guest}}}):
        (message,) = check_settings()
    assert message.id == "flyfn.E001"
    assert message.msg.startswith('FLYFN["GROUPS"]["pdf"]["guest"]["memory_mb"]: Fly refuses')
    assert rule in message.msg


@pytest.mark.parametrize(
    "guest",
    [
        {},  # shared-cpu-1x, 256 MB
        {"memory_mb": 2048},
        {"cpus": 8, "memory_mb": 16384},
        {"cpu_kind": "performance", "memory_mb": 2048},
        {"cpu_kind": "performance", "memory_mb": 3072},
        {"cpu_kind": "performance", "cpus": 16, "memory_mb": 131072},
    ],
)
def test_guest_sizes_fly_accepts_pass(guest: dict[str, Any]) -> None:
    with override_settings(FLYFN={"GROUPS": {"pdf": {"guest": guest}}}):
        assert check_settings() == []


def test_e002_unknown_group_option() -> None:
    with override_settings(FLYFN={"GROUPS": {"pdf": {"autostp": "stop"}}}):
        (message,) = check_settings()
    assert message.id == "flyfn.E002"
    assert '["autostp"]' in message.msg
    assert '"autostop"' in message.msg


def test_e003_unknown_method() -> None:
    with override_settings(FLY_MACHINES_SERVERLESS_FUNCTIONS=[("shop:receipt", ("GTE",))]):
        (message,) = check_settings()
    assert message.id == "flyfn.E003"
    assert message.msg.startswith("FLY_MACHINES_SERVERLESS_FUNCTIONS[0]: unknown HTTP method 'GTE'")


def test_invalid_settings_fail_manage_py_check() -> None:
    with (
        override_settings(FLYFN={"GROUPS": {"pdf": {"autostop": "sometimes"}}}),
        pytest.raises(SystemCheckError, match=r"flyfn\.E001"),
    ):
        call_command("check")


def test_e006_groups_whose_machine_names_collide() -> None:
    # "pdf" is a decorated view's group (tests.testapp.routing); "p_df" is not the same name.
    groups: dict[str, dict[str, Any]] = {"a_b": {}, "a-b": {}, "pdf": {}, "p_df": {}, "x--y": {}}
    with override_settings(FLYFN={"GROUPS": groups}):
        (message,) = check_machine_names()
    assert message.id == "flyfn.E006"
    assert "'a-b', 'a_b'" in message.msg
    assert "flyfn-a-b-" in message.msg
    assert message.hint
    assert "Rename" in message.hint


def test_e006_groups_in_different_apps_may_share_a_name() -> None:
    groups = {"a_b": {"strategy": "app", "app": "fns-one"}, "a-b": {}}
    with override_settings(FLYFN={"GROUPS": groups}):
        assert check_machine_names() == []


def test_e006_a_decorated_views_group_counts() -> None:
    with override_settings(FLYFN={"GROUPS": {"default_": {}}}):  # as decorated "default"
        (message,) = check_machine_names()
    assert "'default', 'default_'" in message.msg


def test_e005_app_without_token() -> None:
    with override_settings(FLYFN={"APP_NAME": "shop"}):
        (message,) = check_settings()
    assert message.id == "flyfn.E005"
    assert "'shop'" in message.msg
    assert "FLY_API_TOKEN" in (message.hint or "")
    with override_settings(FLYFN={"APP_NAME": "shop", "API_TOKEN": "tok"}):
        assert check_settings() == []


def test_e005_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLY_APP_NAME", "shop")
    reset_settings()
    assert ids(check_settings()) == ["flyfn.E005"]
    monkeypatch.setenv("FLY_API_TOKEN", "FlyV1 secret-token")
    reset_settings()
    assert check_settings() == []


def test_w003_body_limit_above_fly() -> None:
    with override_settings(FLYFN={"REPLAY_BODY_LIMIT": 5_000_000}):
        (message,) = check_settings()
    assert message.id == "flyfn.W003"
    with override_settings(FLYFN={"REPLAY_BODY_LIMIT": 1_000_000}):
        assert check_settings() == []


# --------------------------------------------------------------------------- views


@override_settings(FLYFN={"VIEWS": {"label": ["GET"]}}, ROOT_URLCONF="tests.test_registry")
def test_e004_not_for_a_view_inside_a_plain_include() -> None:
    assert [m for m in check_views() if m.id == "flyfn.E004"] == []


@override_settings(ROOT_URLCONF="tests.test_registry")
def test_e004_url_name_that_does_not_resolve() -> None:
    with override_settings(
        FLYFN={"VIEWS": {"store:receipt": ["GET"], "store:missing": ["GET"]}},
        FLY_MACHINES_SERVERLESS_FUNCTIONS=[("shop:receipt", ("GET",)), ("gone", ("GET",))],
    ):
        messages = check_views()
    assert ids(messages) == ["flyfn.E004", "flyfn.E004"]
    texts = sorted(m.msg for m in messages)
    assert texts[0].startswith("FLYFN[\"VIEWS\"] declares 'store:missing'")
    assert texts[1].startswith("FLY_MACHINES_SERVERLESS_FUNCTIONS declares 'gone'")


def test_e004_broken_urlconf() -> None:
    with override_settings(ROOT_URLCONF="tests.no_such_urlconf", FLYFN={"VIEWS": {"top": ["GET"]}}):
        (message,) = check_views()
    assert message.id == "flyfn.E004"
    assert "urlconf failed to load" in message.msg


def test_w004_class_based_view_without_a_handler() -> None:
    class OnlyGet(View):
        def get(self, request: HttpRequest) -> HttpResponse:
            return HttpResponse()

    registry.register(OnlyGet, ["GET", "POST"], "default")
    try:
        messages = [m for m in check_views() if m.obj is OnlyGet]
    finally:
        registry.unregister(OnlyGet)
    (message,) = messages
    assert message.id == "flyfn.W004"
    assert "POST" in message.msg
    assert "GET" not in message.msg.split("for ", 1)[1].split(" but")[0]


# --------------------------------------------------------------------------- middleware


@pytest.mark.parametrize(
    ("middleware", "expected"),
    [
        ([SECURITY, SESSIONS, AUTH], ["flyfn.W001"]),
        ([], ["flyfn.W001"]),
        ([SECURITY, MIDDLEWARE_PATH, SESSIONS, AUTH], []),
        ([MIDDLEWARE_PATH], []),
        ([SECURITY, COMMON, MIDDLEWARE_PATH], []),
        ([SESSIONS, MIDDLEWARE_PATH], ["flyfn.W002"]),
        ([SECURITY, CSRF, MIDDLEWARE_PATH], ["flyfn.W002"]),
        ([f"{__name__}.CustomSessionMiddleware", MIDDLEWARE_PATH], ["flyfn.W002"]),
        (["no.such.Middleware", MIDDLEWARE_PATH], []),
    ],
)
def test_middleware_presence_and_position(middleware: list[str], expected: list[str]) -> None:
    with override_settings(MIDDLEWARE=middleware):
        assert ids(check_middleware()) == expected


def test_w002_names_the_middleware_before_it() -> None:
    with override_settings(MIDDLEWARE=[SESSIONS, AUTH, COMMON, MIDDLEWARE_PATH]):
        (message,) = check_middleware()
    assert SESSIONS in message.msg
    assert AUTH in message.msg
    assert COMMON not in message.msg


def test_checks_are_registered_with_django() -> None:
    from django.core.checks.registry import registry as check_registry

    registered: set[Any] = set(check_registry.get_checks())
    assert {check_settings, check_views, check_middleware} <= registered


# --------------------------------------------------------------------------- secrets (issue 16)


@pytest.mark.parametrize(
    "name",
    [
        "SECRET_KEY",
        "FLY_API_TOKEN",
        "DATABASE_URL",
        "REDIS_URL",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "STRIPE_API_KEY",
        "DB_PASSWORD",
        "SMTP_PASS",
        "MYSQL_PWD",
        "SENTRY_DSN",
        "GOOGLE_CREDENTIALS",
        "SSH_PRIVATE_KEY",
        "AUTH_HEADER",
        "secret_key",
    ],
)
def test_e010_a_secret_like_name_in_a_groups_env(name: str) -> None:
    with override_settings(FLYFN={"GROUPS": {"pdf": {"env": ["LOG_LEVEL", name]}}}):
        (message,) = check_settings()
    assert message.id == "flyfn.E010"
    assert f'FLYFN["GROUPS"]["pdf"]["env"] lists {name!r}' in message.msg
    assert f"fly secrets set {name}=" in (message.hint or "")
    assert " -a " not in (message.hint or "")


def test_e010_the_app_strategy_hint_names_the_function_app() -> None:
    groups = {"pdf": {"strategy": "app", "app": "shop-fn", "env": ["SECRET_KEY"]}}
    with override_settings(FLYFN={"GROUPS": groups}):
        (message,) = check_settings()
    assert message.id == "flyfn.E010"
    assert "fly secrets set SECRET_KEY=... -a shop-fn" in (message.hint or "")


def test_e010_a_value_with_a_password_in_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    password = "hunter2-not-shown"
    monkeypatch.setenv("CACHE_LOCATION", f"redis://default:{password}@cache.internal:6379/0")
    monkeypatch.setenv("STATUS_PAGE", "https://status.example.com/a:b@c")
    groups = {"pdf": {"env": ["CACHE_LOCATION", "STATUS_PAGE"]}}
    with override_settings(FLYFN={"GROUPS": groups}):
        (message,) = check_settings()
    assert message.id == "flyfn.E010"
    assert "'CACHE_LOCATION'" in message.msg
    assert password not in f"{message.msg} {message.hint}"


def test_plain_names_in_env_are_fine() -> None:
    env = ["DEBUG", "ALLOWED_HOSTS", "CSRF_TRUSTED_ORIGINS", "LOG_LEVEL", "TZ", "PORT"]
    with override_settings(FLYFN={"GROUPS": {"pdf": {"env": env}}}):
        assert check_settings() == []


def test_secret_like_env_reads_the_environment_it_is_given() -> None:
    environ = {"A": "postgres://u:p@db/x", "B": "postgres://db/x", "C": "u:p@x"}
    assert secret_like_env(["A", "B", "C", "D", "API_KEY"], environ) == ["A", "API_KEY"]


# ---------------------------------------------------------------------- API_HOSTNAME (issue 16)


@pytest.mark.parametrize("url", ["http://api.machines.dev", "http://10.0.0.5:4280"])
def test_e011_the_token_would_travel_in_clear_text(url: str) -> None:
    with override_settings(FLYFN={"API_HOSTNAME": url}):
        (message,) = check_settings()
    assert message.id == "flyfn.E011"
    assert url in message.msg
    assert "https://" in (message.hint or "")


@pytest.mark.parametrize(
    "url", ["https://api.machines.dev", "http://_api.internal:4280", "http://127.0.0.1:9"]
)
def test_e011_not_for_https_the_private_network_or_loopback(url: str) -> None:
    with override_settings(FLYFN={"API_HOSTNAME": url}):
        assert check_settings() == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999", "http://[::1"])
def test_e001_a_malformed_api_hostname(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLY_API_HOSTNAME", url)
    reset_settings()
    (message,) = check_settings()
    assert message.id == "flyfn.E001"
    assert message.msg.startswith("env FLY_API_HOSTNAME: must be an http(s) URL")
