"""flyfn.machine_role: the role (local / main / function) and Machine variables from the env."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flyfn import machine_role
from flyfn.machine_role import (
    LOCAL,
    MAIN,
    MachineEnv,
    Role,
    RoleError,
    current_env,
    current_role,
    detect_env,
    detect_role,
    override_role,
)

FLY_VARS = (
    "FLYFN_GROUP",
    "IS_FLY_MACHINE_SERVERLESS",
    "FLY_APP_NAME",
    "FLY_MACHINE_ID",
    "FLY_ALLOC_ID",
    "FLY_REGION",
    "FLY_IMAGE_REF",
    "FLY_PRIVATE_IP",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in FLY_VARS:
        monkeypatch.delenv(name, raising=False)
    machine_role.reset()
    yield
    machine_role.reset()


@pytest.mark.parametrize(
    ("environ", "role"),
    [
        ({}, LOCAL),
        ({"FLY_APP_NAME": "  "}, LOCAL),
        ({"FLY_APP_NAME": "shop"}, MAIN),
        ({"FLY_APP_NAME": "shop", "FLYFN_GROUP": "pdf"}, Role("function", "pdf")),
        ({"FLYFN_GROUP": "pdf"}, Role("function", "pdf")),
        (
            {"FLY_APP_NAME": "shop", "IS_FLY_MACHINE_SERVERLESS": "true"},
            Role("function", "default"),
        ),
        ({"IS_FLY_MACHINE_SERVERLESS": "True"}, Role("function", "default")),
        ({"IS_FLY_MACHINE_SERVERLESS": "1"}, Role("function", "default")),
        ({"FLY_APP_NAME": "shop", "IS_FLY_MACHINE_SERVERLESS": "false"}, MAIN),
        ({"FLYFN_GROUP": "pdf", "IS_FLY_MACHINE_SERVERLESS": "true"}, Role("function", "pdf")),
        ({"FLYFN_GROUP": "", "FLY_APP_NAME": "shop"}, MAIN),
    ],
)
def test_detect_role(environ: dict[str, str], role: Role) -> None:
    assert detect_role(environ) == role


def test_role_properties_and_str() -> None:
    function = Role("function", "pdf")
    assert (LOCAL.is_local, MAIN.is_main, function.is_function) == (True, True, True)
    assert not function.is_main
    assert not MAIN.is_local
    assert [str(LOCAL), str(MAIN), str(function)] == ["local", "main", "function(pdf)"]
    assert machine_role.function("pdf") == function


def test_an_invalid_group_in_the_environment_is_a_clear_error() -> None:
    with pytest.raises(RoleError, match="FLYFN_GROUP: invalid group name 'PDF Jobs'"):
        detect_role({"FLYFN_GROUP": "PDF Jobs"})


def test_detect_env() -> None:
    env = detect_env(
        {
            "FLY_APP_NAME": "shop",
            "FLY_ALLOC_ID": "0e1f2a3b4c5d6e",
            "FLY_REGION": "ams",
            "FLY_IMAGE_REF": "registry.fly.io/shop:deployment-1",
            "FLY_PRIVATE_IP": "fdaa::3",
        }
    )
    assert env == MachineEnv(
        "shop", "0e1f2a3b4c5d6e", "ams", "registry.fly.io/shop:deployment-1", "fdaa::3"
    )
    assert detect_env({"FLY_MACHINE_ID": "a", "FLY_ALLOC_ID": "b"}).machine_id == "a"
    assert detect_env({}) == MachineEnv()


def test_current_role_is_read_once_and_reset_rereads(monkeypatch: pytest.MonkeyPatch) -> None:
    assert current_role() == LOCAL
    assert current_env().app_name is None
    monkeypatch.setenv("FLY_APP_NAME", "shop")
    monkeypatch.setenv("FLY_MACHINE_ID", "0e1f")
    assert current_role() == LOCAL  # cached since start-up
    assert current_env().machine_id is None
    machine_role.reset()
    assert current_role() == MAIN
    assert current_env().machine_id == "0e1f"


def test_override_role_restores_the_previous_role() -> None:
    assert current_role() == LOCAL
    env = MachineEnv(app_name="shop", machine_id="9a2c")
    with override_role(Role("function", "pdf"), env) as role:
        assert current_role() is role
        assert current_env() is env
        with override_role(MAIN):
            assert current_role() == MAIN
            assert current_env() is env
        assert current_role() is role
    assert current_role() == LOCAL
    assert current_env() == MachineEnv()
