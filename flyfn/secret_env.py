"""Which environment variables hold secrets: the one rule behind system check flyfn.E010 and the
pool spec's refusal to copy such a variable into function Machines' config (readable by anyone who
can list the app's Machines)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from urllib.parse import parse_qsl, urlsplit

__all__ = ["secret_env_message", "secret_like_env", "secret_like_name", "secret_like_value"]

# Names that hold secrets: the words of the usual ones, the names Fly's integrations set as app
# secrets (Postgres, Upstash Redis, Tigris, Sentry) and other connection URLs, webhook URLs (the
# URL is the credential), personal access tokens, cookies, salts and bearer values. Fly gives an
# app's secrets to every Machine of that app, the API-created ones included: they never need
# forwarding.
_SECRET_NAME_RE = re.compile(
    r"SECRET|TOKEN|KEY|PASS|PWD|CREDENTIAL|PRIVATE|DSN|SIGNATURE|BEARER|(?:^|_)AUTH|"
    r"WEBHOOK(?:S|_?UR[LI])?$|(?:^|_)(?:PAT|SALT)(?:_|$)|(?:^|_)COOKIES?$|"
    r"CONN(?:ECTION)?_?STR(?:ING)?$|"
    r"^(?:\w+_)?(?:DATABASE|DB|POSTGRES(?:QL)?|PG|MYSQL|MARIADB|REDIS|VALKEY|MONGO(?:DB)?|AMQP|"
    r"RABBITMQ|CELERY_BROKER|BROKER)_UR[LI]$",
    re.IGNORECASE,
)
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# A URL with a password in it (scheme://user:password@host): a secret whatever its name.
_URL_CREDENTIALS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]*:[^/@\s]+@")
# Query parameters that carry a credential (`?password=`, `?sslpassword=`, `?token=`, AWS's
# presigned `X-Amz-Signature`, `?api_key=`, `?key=`).
_SECRET_PARAM_RE = re.compile(
    r"password|passwd|secret|token|signature|credential|(?:^|[_.-])(?:pass|pwd|sig|key|apikey)$",
    re.IGNORECASE,
)
# libpq's keyword form: `host=db user=app password=...`.
_KEYWORD_PASSWORD_RE = re.compile(r"(?:^|\s)password\s*=\s*\S", re.IGNORECASE)
# Values that are credentials by their look: webhook URLs whose path is the secret, and tokens with
# a well-known prefix (Fly, GitHub, GitLab, Slack, Stripe, OpenAI, AWS access key ids, JWTs).
_SECRET_VALUE_RE = re.compile(
    r"^https?://(?:hooks\.slack\.com/|(?:[\w-]+\.)?discord(?:app)?\.com/api/webhooks/)|"
    r"^(?:FlyV1\s|fm[12]_|fo1_|gh[pousr]_|github_pat_|glpat-|xox[abeoprs]-|[sr]k_(?:live|test)_|"
    r"sk-(?:proj-)?[\w-]{20}|AKIA[0-9A-Z]{16}$|eyJ[\w-]+\.eyJ[\w-]+\.)"
)


def secret_like_name(name: str) -> bool:
    """Whether `name` is the name of a secret."""
    return _SECRET_NAME_RE.search(name) is not None


def secret_like_value(value: str) -> bool:
    """Whether `value` carries a credential: a URL with a password (in its user part or its query
    string), a libpq `password=` keyword, a webhook URL, a token of a well-known form. The value is
    only matched, never shown."""
    value = value.strip()
    if not value:
        return False
    if _SECRET_VALUE_RE.match(value) or _KEYWORD_PASSWORD_RE.search(value):
        return True
    if not _URL_RE.match(value):
        return False
    if _URL_CREDENTIALS_RE.match(value):
        return True
    try:
        query = urlsplit(value).query
    except ValueError:
        return False
    return any(_SECRET_PARAM_RE.search(key) and param for key, param in parse_qsl(query, True))


def secret_like_env(names: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The names among `names` that hold secrets: by name, or by their value in `environ`."""
    return [
        name for name in names if secret_like_name(name) or secret_like_value(environ.get(name, ""))
    ]


def secret_env_message(group: str, name: str) -> str:
    """What flyfn.E010 and the pool spec say about secret-like `name` in `group`'s env."""
    return (
        f'FLYFN["GROUPS"]["{group}"]["env"] lists {name!r}, which looks like a secret: its value '
        "would be copied into the function Machines' config, which anyone who can list the app's "
        "Machines can read."
    )
