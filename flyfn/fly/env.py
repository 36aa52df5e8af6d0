"""The environment variables Fly sets on a Machine (and flyfn sets on its function Machines), and
how one is read: a blank value counts as unset."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "FLY_ALLOC_ID",
    "FLY_API_HOSTNAME",
    "FLY_API_TOKEN",
    "FLY_APP_NAME",
    "FLY_IMAGE_REF",
    "FLY_MACHINE_ID",
    "FLY_PRIVATE_IP",
    "FLY_REGION",
    "GROUP_ENV",
    "HOME_APP_ENV",
    "PRIMARY_REGION",
    "SEED_ENV",
    "TIME_SCALE_ENV",
    "env_value",
]

FLY_APP_NAME = "FLY_APP_NAME"
FLY_MACHINE_ID = "FLY_MACHINE_ID"
FLY_ALLOC_ID = "FLY_ALLOC_ID"
FLY_REGION = "FLY_REGION"
FLY_IMAGE_REF = "FLY_IMAGE_REF"
FLY_PRIVATE_IP = "FLY_PRIVATE_IP"
# The app's primary region (fly.toml `primary_region`), where its database usually is.
PRIMARY_REGION = "PRIMARY_REGION"
# Not set by Fly: the Machines API's address and token, as `fly secrets set` gives them.
FLY_API_HOSTNAME = "FLY_API_HOSTNAME"
FLY_API_TOKEN = "FLY_API_TOKEN"  # noqa: S105 - a variable's name, not a secret
# Set by flyfn on every function Machine: its group.
GROUP_ENV = "FLYFN_GROUP"
# Set by flyfn on function Machines that live in another app (the `app` strategy): the app whose
# app Machines created them and route their group's requests (FLY_APP_NAME names their own app).
HOME_APP_ENV = "FLYFN_HOME_APP"
# The seed's marker of a function Machine (group "default").
SEED_ENV = "IS_FLY_MACHINE_SERVERLESS"
# Set by `flyfn dev --time-scale N` on its Machines: schedules' slots last 1/N of their time, as
# the emulated Fly starts scheduled Machines N times as often.
TIME_SCALE_ENV = "FLYFN_TIME_SCALE"


def env_value(environ: Mapping[str, str], name: str) -> str | None:
    """The variable's value without surrounding space; None when it is unset or blank."""
    value = environ.get(name, "").strip()
    return value or None
