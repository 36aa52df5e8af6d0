"""flyfn.conf: FLYFN validation, defaults, env fallbacks, error messages, live reading."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from flyfn.conf import (
    MAX_REPLAY_TIMEOUT,
    STATE_VALIDITY_MARGIN,
    ConcurrencySettings,
    FlyfnSettings,
    GroupSettings,
    SettingsError,
    _Root,
    get_settings,
    load_settings,
    reset_settings,
)
from flyfn.fly.api_host import DEFAULT_API_HOSTNAME
from flyfn.registry import ServerlessView
from flyfn.replay_state import MAX_STATE_AGE
from flyfn.settings_errors import _options, _type_at, _without_none, key_text, show

NO_ENV: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("FLY_APP_NAME", "FLY_API_HOSTNAME", "FLY_API_TOKEN", "FLY_IMAGE_REF"):
        monkeypatch.delenv(name, raising=False)
    reset_settings()
    yield
    reset_settings()


def errors_of(flyfn: Any = None, seed: Any = None, env: dict[str, str] = NO_ENV) -> SettingsError:
    with pytest.raises(SettingsError) as info:
        load_settings(flyfn, seed, environ=env)
    return info.value


# --------------------------------------------------------------------------- defaults


def test_defaults_without_any_setting() -> None:
    settings = load_settings(environ=NO_ENV)
    assert settings.app_name is None
    assert settings.api_hostname == DEFAULT_API_HOSTNAME == "https://api.machines.dev"
    assert settings.api_token is None
    assert settings.image_ref is None
    assert settings.views == {}
    assert settings.replay_body_limit == 1_000_000
    assert settings.cache_ttl == 30.0
    assert settings.sign_replays is True
    assert settings.groups == {}


def test_undeclared_group_gets_the_defaults() -> None:
    group = load_settings({"GROUPS": {"pdf": {"machines": 3}}}, environ=NO_ENV).group("other")
    assert group == GroupSettings()
    assert group.guest.cpu_kind == "shared"
    assert group.guest.cpus == 1
    assert group.guest.memory_mb == 256
    assert group.machines == 1
    assert group.autostop == "stop"
    assert group.internal_port == 8000
    assert group.region is None
    assert group.env == ()
    assert group.strategy == "instance"
    assert group.app is None
    assert group.replay_timeout == "10s"
    assert group.replay_timeout_seconds == 10.0
    assert group.fallback == "local"
    assert group.fallback_concurrency == 4


def test_a_declared_group_keeps_its_values() -> None:
    settings = load_settings(
        {
            "GROUPS": {
                "pdf": {
                    "guest": {"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096},
                    "machines": 3,
                    "autostop": "suspend",
                    "internal_port": 8080,
                    "region": "ams",
                    "env": ["DATABASE_URL", "SENTRY_DSN", "DATABASE_URL"],
                    "strategy": "app",
                    "app": "shop-functions",
                    "replay_timeout": "800ms",
                    "fallback": "error",
                    "fallback_concurrency": 1,
                }
            }
        },
        environ=NO_ENV,
    )
    group = settings.group("pdf")
    assert group.guest.model_dump() == {"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096}
    assert (group.machines, group.autostop, group.internal_port) == (3, "suspend", 8080)
    assert group.region == "ams"
    assert group.env == ("DATABASE_URL", "SENTRY_DSN")  # deduplicated, order kept
    assert (group.strategy, group.app) == ("app", "shop-functions")
    assert group.replay_timeout_seconds == pytest.approx(0.8)
    assert group.state_max_age == pytest.approx(30.8)
    assert (group.fallback, group.fallback_concurrency) == ("error", 1)


@pytest.mark.parametrize(("given", "expected"), [(True, "stop"), (False, "off")])
def test_autostop_accepts_fly_toml_booleans(given: bool, expected: str) -> None:
    groups = {"g": {"autostop": given}}
    assert load_settings({"GROUPS": groups}, environ=NO_ENV).group("g").autostop == expected


@pytest.mark.parametrize(("given", "expected"), [(2, "2s"), (0.25, "250ms"), (" 5s ", "5s")])
def test_replay_timeout_accepts_seconds(given: object, expected: str) -> None:
    groups = {"g": {"replay_timeout": given}}
    assert load_settings({"GROUPS": groups}, environ=NO_ENV).group("g").replay_timeout == expected


# --------------------------------------------------------------------------- env defaults


def test_env_supplies_missing_keys() -> None:
    env = {
        "FLY_APP_NAME": "shop",
        "FLY_API_HOSTNAME": "http://_api.internal:4280/",
        "FLY_API_TOKEN": "FlyV1 fm2_secret",
        "FLY_IMAGE_REF": "registry.fly.io/shop:deployment-01H",
    }
    settings = load_settings(environ=env)
    assert settings.app_name == "shop"
    assert settings.api_hostname == "http://_api.internal:4280"
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == "FlyV1 fm2_secret"
    assert settings.image_ref == "registry.fly.io/shop:deployment-01H"


def test_flyfn_keys_win_over_env_and_blank_env_is_ignored() -> None:
    settings = load_settings(
        {"APP_NAME": "other", "API_TOKEN": "tok"},
        environ={"FLY_APP_NAME": "shop", "FLY_API_TOKEN": "env-tok", "FLY_IMAGE_REF": "  "},
    )
    assert settings.app_name == "other"
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == "tok"
    assert settings.image_ref is None


def test_an_invalid_env_value_is_blamed_on_the_env_var() -> None:
    error = errors_of(env={"FLY_API_HOSTNAME": "api.machines.dev"})
    assert str(error).startswith("env FLY_API_HOSTNAME: must be an http(s) URL")


# --------------------------------------------------------------------------- errors


def test_bad_choice_names_the_key_and_the_allowed_values() -> None:
    error = errors_of({"GROUPS": {"pdf": {"autostop": "sometimes"}}})
    assert str(error) == (
        'FLYFN["GROUPS"]["pdf"]["autostop"]: must be one of "stop", "suspend", "off" '
        '(got "sometimes")'
    )
    assert isinstance(error, ImproperlyConfigured)
    assert [issue.kind for issue in error.issues] == ["value"]


@pytest.mark.parametrize(
    ("flyfn", "key", "fragment"),
    [
        ({"GROUPS": {"g": {"strategy": "fast"}}}, '["g"]["strategy"]', '"instance", "app"'),
        ({"GROUPS": {"g": {"fallback": "retry"}}}, '["g"]["fallback"]', '"local", "error"'),
        ({"GROUPS": {"g": {"guest": {"cpu_kind": "gpu"}}}}, '["cpu_kind"]', '"shared"'),
        ({"GROUPS": {"g": {"guest": {"cpus": 3}}}}, '["cpus"]', "1, 2, 4, 8, 16"),
        ({"GROUPS": {"g": {"guest": {"cpus": True}}}}, '["cpus"]', "1, 2, 4, 8, 16"),
        ({"GROUPS": {"g": {"guest": {"cpus": 2.0}}}}, '["cpus"]', "1, 2, 4, 8, 16"),
        ({"GROUPS": {"g": {"guest": {"memory_mb": 300}}}}, '["memory_mb"]', "multiple of 256"),
        ({"GROUPS": {"g": {"machines": 0}}}, '["g"]["machines"]', "greater than or equal to 1"),
        ({"GROUPS": {"g": {"internal_port": 70000}}}, '["internal_port"]', "65535"),
        ({"GROUPS": {"g": {"replay_timeout": "soon"}}}, '["replay_timeout"]', '"10s"'),
        ({"GROUPS": {"g": {"region": "Amsterdam"}}}, '["g"]["region"]', "region code"),
        ({"GROUPS": {"g": {"env": "DATABASE_URL"}}}, '["g"]["env"]', "list"),
        ({"GROUPS": {"g": {"env": ["not valid"]}}}, '["g"]["env"]', "names"),
        ({"GROUPS": {"g": {"strategy": "app"}}}, '["g"]["app"]', 'required when strategy is "app"'),
        ({"GROUPS": {"Bad Name": {}}}, '["GROUPS"]["Bad Name"]', "invalid group name"),
        ({"GROUPS": {"g": "pdf"}}, '["GROUPS"]["g"]', "must be a dict"),
        ({"APP_NAME": "My App"}, '["APP_NAME"]', "Fly app name"),
        ({"CACHE_TTL": 0}, '["CACHE_TTL"]', "greater than 0"),
        ({"REPLAY_BODY_LIMIT": -1}, '["REPLAY_BODY_LIMIT"]', "got -1"),
        ({"SIGN_REPLAYS": "perhaps"}, '["SIGN_REPLAYS"]', "boolean"),
        ({"VIEWS": ["shop:receipt"]}, '["VIEWS"]', "must be a dict"),
    ],
)
def test_invalid_values_name_their_key(flyfn: dict[str, Any], key: str, fragment: str) -> None:
    error = errors_of(flyfn)
    assert len(error.issues) == 1
    issue = error.issues[0]
    assert issue.key.startswith("FLYFN[")
    assert issue.key.endswith(key)
    assert fragment in issue.message


def test_every_invalid_value_is_reported_at_once() -> None:
    error = errors_of({"CACHE_TTL": -1, "GROUPS": {"a": {"autostop": "x", "machines": 0}}})
    assert {issue.key for issue in error.issues} == {
        'FLYFN["CACHE_TTL"]',
        'FLYFN["GROUPS"]["a"]["autostop"]',
        'FLYFN["GROUPS"]["a"]["machines"]',
    }


@pytest.mark.parametrize(
    ("flyfn", "key", "known"),
    [
        ({"GROUP": {}}, 'FLYFN["GROUP"]', '"GROUPS"'),
        (
            {"GROUPS": {"pdf": {"autostp": "stop"}}},
            'FLYFN["GROUPS"]["pdf"]["autostp"]',
            '"autostop"',
        ),
        ({"GROUPS": {"pdf": {"guest": {"ram": 1}}}}, '["guest"]["ram"]', '"memory_mb"'),
        ({"VIEWS": {"a:b": {"method": ["GET"]}}}, 'FLYFN["VIEWS"]["a:b"]["method"]', '"methods"'),
    ],
)
def test_unknown_keys_list_the_known_ones(flyfn: dict[str, Any], key: str, known: str) -> None:
    (issue,) = errors_of(flyfn).issues
    assert issue.kind == "unknown_key"
    assert issue.key.endswith(key)
    assert "unknown option" in issue.message
    assert known in issue.message


def test_the_token_never_appears_in_errors_or_reprs() -> None:
    secret = "fm2_very_secret_token_value"
    error = errors_of({"API_TOKEN": [secret]})
    assert secret not in str(error)
    assert secret not in repr(error.issues)
    assert error.__cause__ is None
    assert error.__suppress_context__
    settings = load_settings({"API_TOKEN": secret}, environ=NO_ENV)
    assert secret not in repr(settings)
    assert secret not in str(settings)
    assert secret not in repr(settings.model_dump())


def test_a_non_dict_flyfn_is_an_error() -> None:
    assert str(errors_of(["GROUPS"])) == "FLYFN: must be a dict (got list)"


# --------------------------------------------------------------------------- views


def test_views_in_list_and_dict_form() -> None:
    settings = load_settings(
        {
            "VIEWS": {
                "shop:receipt": ["get"],
                "shop:upload": {"methods": ["POST", "put"], "group": "pdf"},
                "report": "GET",
            }
        },
        environ=NO_ENV,
    )
    receipt = settings.views["shop:receipt"]
    assert receipt.methods == frozenset({"GET", "HEAD"})
    assert receipt.group == "default"
    assert receipt.name == "shop:receipt"
    upload = settings.views["shop:upload"]
    assert upload.methods == frozenset({"POST", "PUT"})
    assert upload.group == "pdf"
    assert settings.views["report"].methods == frozenset({"GET", "HEAD"})
    assert settings.declared_views == settings.views


def test_unknown_method_in_views_is_a_method_issue() -> None:
    (issue,) = errors_of({"VIEWS": {"shop:receipt": ["GTE"]}}).issues
    assert issue.kind == "method"
    assert issue.key == 'FLYFN["VIEWS"]["shop:receipt"]'
    assert "'GTE'" in issue.message
    assert "GET" in issue.message


def test_seed_setting_is_honoured_and_views_win() -> None:
    settings = load_settings(
        {"VIEWS": {"shop:receipt": {"methods": ["POST"], "group": "pdf"}}},
        [("shop:receipt", ("GET",)), ("shop:report", ["GET", "POST"]), "shop:bare"],
        environ=NO_ENV,
    )
    assert settings.views["shop:receipt"].group == "pdf"
    assert settings.views["shop:receipt"].methods == frozenset({"POST"})
    assert settings.views["shop:report"].methods == frozenset({"GET", "HEAD", "POST"})
    assert settings.views["shop:report"].group == "default"
    assert settings.views["shop:bare"].methods == frozenset({"GET", "HEAD"})


@pytest.mark.parametrize(
    ("seed", "key", "kind"),
    [
        (
            [("shop:a", ("GET",)), ("shop:b", ("FETCH",))],
            "FLY_MACHINES_SERVERLESS_FUNCTIONS[1]",
            "method",
        ),
        ([("shop:a",)], "FLY_MACHINES_SERVERLESS_FUNCTIONS[0]", "value"),
        ("shop:a", "FLY_MACHINES_SERVERLESS_FUNCTIONS", "value"),
        ([("", ("GET",))], "FLY_MACHINES_SERVERLESS_FUNCTIONS[0]", "value"),
    ],
)
def test_invalid_seed_entries_name_their_index(seed: Any, key: str, kind: str) -> None:
    (issue,) = errors_of(None, seed).issues
    assert (issue.key, issue.kind) == (key, kind)


# --------------------------------------------------------------------------- live reading


def test_get_settings_is_cached_and_follows_override_settings() -> None:
    first = get_settings()
    assert get_settings() is first
    with override_settings(FLYFN={"GROUPS": {"pdf": {"machines": 2}}}):
        assert get_settings().group("pdf").machines == 2
        with override_settings(FLY_MACHINES_SERVERLESS_FUNCTIONS=[("shop:x", ("GET",))]):
            assert "shop:x" in get_settings().views
        assert "shop:x" not in get_settings().views
    assert get_settings().group("pdf").machines == 1


def test_other_settings_keep_the_cached_flyfn_settings() -> None:
    first = get_settings()
    with override_settings(LANGUAGE_CODE="de"):
        assert get_settings() is first
    assert get_settings() is first


def test_get_settings_raises_for_invalid_settings() -> None:
    with (
        override_settings(FLYFN={"GROUPS": {"pdf": {"autostop": "never"}}}),
        pytest.raises(SettingsError, match="autostop"),
    ):
        get_settings()
    assert isinstance(get_settings(), FlyfnSettings)


def test_reset_settings_rereads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_settings().app_name is None
    monkeypatch.setenv("FLY_APP_NAME", "shop")
    assert get_settings().app_name is None  # cached: read once
    reset_settings()
    assert get_settings().app_name == "shop"


def test_settings_are_immutable() -> None:
    settings = load_settings(environ=NO_ENV)
    with pytest.raises(ValueError, match="frozen"):
        settings.cache_ttl = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- durations (#16, #17)


@pytest.mark.parametrize(
    "given",
    [True, False, ["10s"], {"s": 10}, None, "\u0661\u0660s", "10 s", float("nan"), float("inf")],
)
def test_a_replay_timeout_that_is_no_duration_is_a_settings_error(given: object) -> None:
    (issue,) = errors_of({"GROUPS": {"g": {"replay_timeout": given}}}).issues
    assert issue.key == 'FLYFN["GROUPS"]["g"]["replay_timeout"]'
    assert issue.kind == "value"
    assert 'must be a duration such as "10s"' in issue.message


@pytest.mark.parametrize("given", ["61s", "2m", 60.001, "1h"])
def test_the_replay_timeout_is_capped(given: object) -> None:
    (issue,) = errors_of({"GROUPS": {"g": {"replay_timeout": given}}}).issues
    assert issue.key == 'FLYFN["GROUPS"]["g"]["replay_timeout"]'
    assert 'must be at most "60s"' in issue.message


def test_the_longest_replay_timeout_keeps_a_state_within_the_cap() -> None:
    group = load_settings({"GROUPS": {"g": {"replay_timeout": "60s"}}}, environ=NO_ENV).group("g")
    assert group.replay_timeout == "60s"
    assert group.state_max_age == MAX_STATE_AGE == MAX_REPLAY_TIMEOUT + STATE_VALIDITY_MARGIN
    assert GroupSettings().state_max_age == 10 + STATE_VALIDITY_MARGIN


# --------------------------------------------------------------------------- API_HOSTNAME (#16)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:99999",
        "http://[::1",
        "http://[::1]:port",
        "http://:4280",
        "http://host:0",
        "https://",
        "ftp://api.machines.dev",
        "api.machines.dev",
        "https://api.machines.dev\n",
        42,
    ],
)
def test_a_malformed_api_hostname_is_a_settings_error(url: object) -> None:
    (issue,) = errors_of({"API_HOSTNAME": url}).issues
    assert issue.key == 'FLYFN["API_HOSTNAME"]'
    assert "must be an http(s) URL" in issue.message
    if isinstance(url, str) and url == url.strip():  # the environment's values are stripped
        (from_env,) = errors_of(env={"FLY_API_HOSTNAME": url}).issues
        assert from_env.key == "env FLY_API_HOSTNAME"


@pytest.mark.parametrize(
    ("url", "in_clear"),
    [
        ("https://api.machines.dev", False),
        ("https://example.com:8443/base/", False),
        ("http://_api.internal:4280", False),
        ("http://127.0.0.1:9", False),
        ("http://127.3.2.1:9", False),
        ("http://[::1]:4280", False),
        ("http://localhost:4280", False),
        ("http://emulator.localhost:4280", True),  # a resolver may not honour RFC 6761
        ("http://api.machines.dev", True),
        ("http://10.0.0.5:4280", True),
        ("http://[fdaa::3]:4280", True),
        ("http://_api.internal.example.com", True),
        ("http://localhost.example.com", True),
    ],
)
def test_which_api_hostnames_would_send_the_token_in_clear(url: str, in_clear: bool) -> None:
    settings = load_settings({"API_HOSTNAME": url}, environ=NO_ENV)
    assert settings.api_in_clear is in_clear


# --------------------------------------------------------------------------- VIEWS, dict form (#17)


@pytest.mark.parametrize(
    ("spec", "methods", "group"),
    [
        ({}, {"GET", "HEAD"}, "default"),
        ({"group": "pdf"}, {"GET", "HEAD"}, "pdf"),
        ({"methods": ["POST"]}, {"POST"}, "default"),
        ({"methods": "put", "group": "pdf"}, {"PUT"}, "pdf"),
    ],
)
def test_the_dict_form_of_views_has_its_documented_defaults(
    spec: dict[str, Any], methods: set[str], group: str
) -> None:
    view = load_settings({"VIEWS": {"shop:receipt": spec}}, environ=NO_ENV).views["shop:receipt"]
    assert view == ServerlessView(frozenset(methods), group, "shop:receipt")


@pytest.mark.parametrize(
    ("views", "key", "fragment"),
    [
        ({"shop:receipt": {"group": "Bad Group"}}, '["VIEWS"]["shop:receipt"]', "group name"),
        ({"shop:receipt": {"methods": []}}, '["VIEWS"]["shop:receipt"]', "no HTTP method"),
        ({"shop:receipt": 5}, '["VIEWS"]["shop:receipt"]', "list of HTTP methods"),
        ({"": ["GET"]}, '["VIEWS"]', "named by its url name"),
        ({5: ["GET"]}, '["VIEWS"]', "named by its url name"),
        ({"shop:x": {"methods": ["GET"], "grup": "a"}}, '["shop:x"]["grup"]', "unknown option"),
    ],
)
def test_views_errors_name_their_key(views: dict[Any, Any], key: str, fragment: str) -> None:
    (issue,) = errors_of({"VIEWS": views}).issues
    assert issue.key.endswith(key)
    assert fragment in issue.message


# --------------------------------------------------------------------------- messages (#17)

# Each error: its key, its kind (the check id) and its exact message, one per place that raises.
SETTINGS_ERRORS: list[tuple[Any, Any, list[tuple[str, str, str]]]] = [
    (
        {"GROUPS": {"g": {"replay_timeout": True}}},
        None,
        [
            (
                'FLYFN["GROUPS"]["g"]["replay_timeout"]',
                "value",
                'must be a duration such as "10s" or "800ms" (got True)',
            )
        ],
    ),
    (
        {"GROUPS": {"g": {"replay_timeout": "soon"}}},
        None,
        [
            (
                'FLYFN["GROUPS"]["g"]["replay_timeout"]',
                "value",
                'must be a duration such as "10s" or "800ms" (got "soon")',
            )
        ],
    ),
    (
        {"GROUPS": {"g": {"replay_timeout": "61s"}}},
        None,
        [
            (
                'FLYFN["GROUPS"]["g"]["replay_timeout"]',
                "value",
                'must be at most "60s" (got "61s"): a signed replay state is accepted for this long plus a margin',  # noqa: E501
            )
        ],
    ),
    (
        {"GROUPS": {"g": {"autostop": "x"}}},
        None,
        [
            (
                'FLYFN["GROUPS"]["g"]["autostop"]',
                "value",
                'must be one of "stop", "suspend", "off" (got "x")',
            )
        ],
    ),
    (
        {"GROUPS": {"g": {"cpus": 3}}},
        None,
        [
            (
                'FLYFN["GROUPS"]["g"]["cpus"]',
                "unknown_key",
                'unknown option; known options: "guest", "machines", "max_machines", "keep_warm", "concurrency", "autostop", "internal_port", "force_https", "http_options", "region", "regions", "env", "secrets", "strategy", "app", "replay_timeout", "fallback", "fallback_concurrency"',  # noqa: E501
            )
        ],
    ),
    (
        {"GROUPS": {"g": {"guest": {"cpus": 3}}}},
        None,
        [
            (
                'FLYFN["GROUPS"]["g"]["guest"]["cpus"]',
                "value",
                "must be one of 1, 2, 4, 8, 16 (got 3)",
            )
        ],
    ),
    (
        {"GROUPS": {"g": {"region": ("iad",)}}},
        None,
        [
            (
                'FLYFN["GROUPS"]["g"]["region"]',
                "value",
                "must be a Fly region code such as \"iad\" (got ('iad',))",
            )
        ],
    ),
    (
        {"GROUPS": {"g": {"machines": 0}}},
        None,
        [
            (
                'FLYFN["GROUPS"]["g"]["machines"]',
                "value",
                "Input should be greater than or equal to 1 (got 0)",
            )
        ],
    ),
    (
        {"GROUPS": {"Bad Name": {}}},
        None,
        [
            (
                'FLYFN["GROUPS"]["Bad Name"]',
                "value",
                "invalid group name 'Bad Name': use 1-30 characters a-z, 0-9, '-' or '_', starting with a letter or digit",  # noqa: E501
            )
        ],
    ),
    (
        {"APP_NAME": "My App"},
        None,
        [('FLYFN["APP_NAME"]', "value", 'must be a Fly app name (a-z, 0-9, -) (got "My App")')],
    ),
    (
        {"VIEWS": None},
        None,
        [('FLYFN["VIEWS"]', "value", 'must be a dict like {"app:url_name": ["GET"]} (got None)')],
    ),
    (
        {"VIEWS": ["shop:x"]},
        None,
        [
            (
                'FLYFN["VIEWS"]',
                "value",
                'must be a dict like {"app:url_name": ["GET"]} (got [\'shop:x\'])',
            )
        ],
    ),
    (
        {"VIEWS": {"": ["GET"]}},
        None,
        [('FLYFN["VIEWS"]', "value", 'a view must be named by its url name (got "")')],
    ),
    (
        {"VIEWS": {"a": {"method": 1}}},
        None,
        [
            (
                'FLYFN["VIEWS"]["a"]["method"]',
                "unknown_key",
                'unknown option; known options: "methods", "group"',
            )
        ],
    ),
    (
        {"VIEWS": {"a": {"group": "Bad"}}},
        None,
        [
            (
                'FLYFN["VIEWS"]["a"]',
                "value",
                "invalid group name 'Bad': use 1-30 characters a-z, 0-9, '-' or '_', starting with a letter or digit",  # noqa: E501
            )
        ],
    ),
    (
        {"VIEWS": {"a": ["GTE"]}},
        None,
        [
            (
                'FLYFN["VIEWS"]["a"]',
                "method",
                "unknown HTTP method 'GTE'; allowed: DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, TRACE",  # noqa: E501
            )
        ],
    ),
    (
        {},
        "x",
        [
            (
                "FLY_MACHINES_SERVERLESS_FUNCTIONS",
                "value",
                'must be a list like [("app:url_name", ("GET",))] (got "x")',
            )
        ],
    ),
    (
        {},
        [5],
        [
            (
                "FLY_MACHINES_SERVERLESS_FUNCTIONS[0]",
                "value",
                'each entry must be ("app:url_name", ("GET", ...)) (got 5)',
            )
        ],
    ),
    (
        {},
        [("shop:x", ["GTE"])],
        [
            (
                "FLY_MACHINES_SERVERLESS_FUNCTIONS[0]",
                "method",
                "unknown HTTP method 'GTE'; allowed: DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, TRACE",  # noqa: E501
            )
        ],
    ),
    (
        {},
        [("", ["GET"])],
        [("FLY_MACHINES_SERVERLESS_FUNCTIONS[0]", "value", "the url name is empty")],
    ),
    (
        {"API_HOSTNAME": "http://[::1"},
        None,
        [
            (
                'FLYFN["API_HOSTNAME"]',
                "value",
                'must be an http(s) URL such as "https://api.machines.dev": its host or port is invalid (got "http://[::1")',  # noqa: E501
            )
        ],
    ),
    (
        {"API_HOSTNAME": "http://fly.test:0"},
        None,
        [
            (
                'FLYFN["API_HOSTNAME"]',
                "value",
                'must be an http(s) URL such as "https://api.machines.dev": its host or port is invalid (got "http://fly.test:0")',  # noqa: E501
            )
        ],
    ),
    (
        {"API_HOSTNAME": "ftp://x"},
        None,
        [
            (
                'FLYFN["API_HOSTNAME"]',
                "value",
                'must be an http(s) URL such as "https://api.machines.dev" (got "ftp://x")',
            )
        ],
    ),
    ({"API_TOKEN": 5}, None, [('FLYFN["API_TOKEN"]', "value", "must be a string (got int)")]),
    (
        {"IMAGE_REF": " "},
        None,
        [('FLYFN["IMAGE_REF"]', "value", 'must be an image reference (got " ")')],
    ),
    (
        {"CACHE_TTL": -1, "SIGN_REPLAYS": "x"},
        None,
        [
            ('FLYFN["CACHE_TTL"]', "value", "Input should be greater than 0 (got -1)"),
            (
                'FLYFN["SIGN_REPLAYS"]',
                "value",
                'Input should be a valid boolean, unable to interpret input (got "x")',
            ),
        ],
    ),
    (
        {"APP_NAME": "a" * 100},
        None,
        [
            (
                'FLYFN["APP_NAME"]',
                "value",
                'must be a Fly app name (a-z, 0-9, -) (got "' + "a" * 56 + "...)",
            )
        ],
    ),
    (
        {"APP_NAME": "A" * 58},
        None,
        [
            (
                'FLYFN["APP_NAME"]',
                "value",
                'must be a Fly app name (a-z, 0-9, -) (got "' + "A" * 58 + '")',
            )
        ],
    ),
    # Not a dict where a section or a dict of sections is expected: a value issue, by type only.
    ({"GROUPS": "pdf"}, None, [('FLYFN["GROUPS"]', "value", "must be a dict (got str)")]),
    (
        {"GROUPS": {"pdf": {"concurrency": 10}}},
        None,
        [('FLYFN["GROUPS"]["pdf"]["concurrency"]', "value", "must be a dict (got int)")],
    ),
    # Pydantic's own message gets the value, except where the key names a token.
    (
        {"GROUPS": {"pdf": {"machines": 0}, "MY_TOKEN": {"machines": 0}}},
        None,
        [
            (
                'FLYFN["GROUPS"]["pdf"]["machines"]',
                "value",
                "Input should be greater than or equal to 1 (got 0)",
            ),
            (
                'FLYFN["GROUPS"]["MY_TOKEN"]',
                "value",
                "invalid group name 'MY_TOKEN': use 1-30 characters a-z, 0-9, '-' or '_', starting with a letter or digit",  # noqa: E501
            ),
            (
                'FLYFN["GROUPS"]["MY_TOKEN"]["machines"]',
                "value",
                "Input should be greater than or equal to 1",
            ),
        ],
    ),
]


@pytest.mark.parametrize(("flyfn", "seed", "issues"), SETTINGS_ERRORS)
def test_each_settings_error(flyfn: Any, seed: Any, issues: list[tuple[str, str, str]]) -> None:
    error = errors_of(flyfn, seed)
    assert [(i.key, i.kind, i.message) for i in error.issues] == issues
    assert str(error) == "; ".join(f"{key}: {message}" for key, _kind, message in issues)


def test_a_shown_value_is_cut_beyond_60_characters() -> None:
    assert show("a" * 58) == '"' + "a" * 58 + '"'  # 60 characters with its quotes
    assert show("a" * 59) == '"' + "a" * 56 + "..."
    assert show(["x"]) == "['x']"


def test_a_locations_first_part_is_written_as_name_key_says() -> None:
    names = {"SEED": "FLY_MACHINES_SERVERLESS_FUNCTIONS", "FLYFN.APP_NAME": "env FLY_APP_NAME"}
    assert key_text(("SEED", 0), names) == "FLY_MACHINES_SERVERLESS_FUNCTIONS[0]"
    assert key_text(("FLYFN", "APP_NAME"), names) == "env FLY_APP_NAME"
    assert key_text(("FLYFN", "GROUPS", "pdf", "env", 1), names) == (
        'FLYFN["GROUPS"]["pdf"]["env"][1]'
    )


def test_the_type_declared_at_a_location() -> None:
    assert _type_at(_Root, ("FLYFN", "GROUPS", "pdf")) is GroupSettings
    assert _type_at(_Root, ("FLYFN", "APP_NAME")) is str
    # Where the models declare nothing: an unknown name, or below a plain value.
    assert _type_at(_Root, ("FLYFN", "NOPE")) is None
    assert _type_at(_Root, ("FLYFN", "APP_NAME", "x")) is None
    assert _options(GroupSettings)[:2] == ["guest", "machines"]
    assert _options(None) == _options(str) == []
    assert _without_none(int | None) is int
    assert _without_none(int | str | None) == int | str | None


def test_a_bare_url_name_in_the_seed_means_get() -> None:
    view = load_settings(seed=["shop:receipt"], environ=NO_ENV).views["shop:receipt"]
    assert view == ServerlessView(frozenset({"GET", "HEAD"}), "default", "shop:receipt")


# --------------------------------------------------------------------------- elastic groups


def test_an_elastic_group_defaults_to_a_fixed_one() -> None:
    group = GroupSettings(machines=3)
    assert group.max_machines is None
    assert group.machine_count == 3
    assert group.concurrency is None


def test_elastic_group_options_are_read() -> None:
    flyfn = {
        "GROUPS": {
            "pdf": {"max_machines": 5, "concurrency": {"soft_limit": 10, "hard_limit": 12}},
        }
    }
    group = load_settings(flyfn, environ=NO_ENV).group("pdf")
    assert (group.machines, group.machine_count) == (1, 5)
    assert group.concurrency is not None
    assert (group.concurrency.soft_limit, group.concurrency.hard_limit) == (10, 12)
    only_soft = load_settings({"GROUPS": {"g": {"concurrency": {"soft_limit": 4}}}}, environ=NO_ENV)
    concurrency = only_soft.group("g").concurrency
    assert concurrency is not None
    assert concurrency.hard_limit is None


def test_a_bound_may_equal_the_option_it_bounds() -> None:
    flyfn = {
        "GROUPS": {
            "pdf": {
                "machines": 3,
                "max_machines": 3,
                "concurrency": {"soft_limit": 8, "hard_limit": 8},
            },
        }
    }
    group = load_settings(flyfn, environ=NO_ENV).group("pdf")
    assert (group.machines, group.max_machines, group.machine_count) == (3, 3, 3)
    assert group.concurrency == ConcurrencySettings(soft_limit=8, hard_limit=8)


@pytest.mark.parametrize(
    ("group", "key", "fragment"),
    [
        ({"machines": 3, "max_machines": 2}, '["max_machines"]', "at least machines (3)"),
        ({"max_machines": 0}, '["max_machines"]', "greater than or equal to 1"),
        ({"max_machines": 101}, '["max_machines"]', "less than or equal to 100"),
        ({"concurrency": {}}, '["concurrency"]["soft_limit"]', "required"),
        (
            {"concurrency": {"soft_limit": 0}},
            '["concurrency"]["soft_limit"]',
            "greater than or equal to 1",
        ),
        (
            {"concurrency": {"soft_limit": 10, "hard_limit": 5}},
            '["concurrency"]["hard_limit"]',
            "at least soft_limit (10)",
        ),
        ({"concurrency": {"soft": 1}}, '["concurrency"]["soft"]', '"soft_limit", "hard_limit"'),
        ({"concurrency": 10}, '["concurrency"]', "must be a dict"),
    ],
)
def test_elastic_group_errors_name_their_key(
    group: dict[str, Any], key: str, fragment: str
) -> None:
    [issue] = errors_of({"GROUPS": {"pdf": group}}).issues
    assert issue.key == f'FLYFN["GROUPS"]["pdf"]{key}'
    assert fragment in issue.message
