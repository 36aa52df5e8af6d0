"""Settings of the demo store, read from the environment (12-factor style, as on Fly)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from demo_store.database_url import parse_database_url
from flyfn.fly.api_host import is_loopback_url
from flyfn.machine_dir import machine_dir

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


DEBUG = env_bool("DEBUG")
# Fly sets FLY_APP_NAME on every Machine. `flyfn dev` does too, but its Machines API runs on this
# computer: that is development, not Fly.
ON_FLY = bool(os.environ.get("FLY_APP_NAME")) and not is_loopback_url(
    os.environ.get("FLY_API_HOSTNAME", "")
)

# Public (it is in this file): only for DEBUG on one computer, never on Fly.
DEV_SECRET_KEY = "demo-store-insecure-dev-key-only-used-when-DEBUG-is-on"  # noqa: S105
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off")
    SECRET_KEY = DEV_SECRET_KEY
if SECRET_KEY == DEV_SECRET_KEY and ON_FLY:
    raise ImproperlyConfigured(
        "SECRET_KEY must be set on Fly: the development key is public. Run: fly secrets set "
        "SECRET_KEY=\"$(python3 -c 'import secrets; print(secrets.token_urlsafe(50))')\""
    )

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS")
if DEBUG and not ALLOWED_HOSTS:
    ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]"]
if fly_app := os.environ.get("FLY_APP_NAME"):
    # Fly Proxy delivers the public host name; replayed requests keep it.
    ALLOWED_HOSTS.append(f"{fly_app}.fly.dev")

# Fly Proxy terminates TLS and says so in X-Forwarded-Proto.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
# HTTPS only on Fly (fly.toml's force_https redirects at the edge too); a local run stays on http.
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", ON_FLY and not DEBUG)
SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS") or (31_536_000 if ON_FLY else 0))
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
# *.fly.dev is on the browsers' HSTS preload list already (the whole .dev top-level domain is).
SECURE_HSTS_PRELOAD = True

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "flyfn",
    "flyfn.tasks",
    "django_tasks_db",
    "store",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # Decides per request where a view runs: receipts are replayed to a function Machine.
    "flyfn.middleware.FlyReplayMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "demo_store.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "store.context_processors.fly_machine",
            ],
        },
    },
]

ASGI_APPLICATION = "demo_store.asgi.application"
WSGI_APPLICATION = "demo_store.wsgi.application"

# Function Machines read the same rows as the app Machines, so on Fly this must be a shared
# database (Postgres); the SQLite default is for one computer (tests, `make demo`).
DATABASES = {
    "default": parse_database_url(
        os.environ.get("DATABASE_URL") or "sqlite:///db.sqlite3", base_dir=BASE_DIR
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT") or BASE_DIR / "staticfiles")
# WhiteNoise answers with sync file iterators, which Django's ASGI handler reads whole and warns
# about; fine for small static files, so the warning is silenced (the PDFs stream asynchronously).
warnings.filterwarnings(
    "ignore",
    message="StreamingHttpResponse must consume synchronous iterators",
    category=Warning,
    module="django.core.handlers.asgi",
)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

# Every receipt view runs on function Machines of the default group. Fly secrets (SECRET_KEY,
# DATABASE_URL, FLY_API_TOKEN) reach every Machine of the app; plain [env] values of fly.toml do
# not reach Machines created through the API, so flyfn forwards the ones named in "env".
FLYFN = {
    # Prometheus metrics for Fly's scraper ([metrics] in fly.toml); off when unset (make demo).
    "METRICS_PORT": int(os.environ["FLYFN_METRICS_PORT"])
    if os.environ.get("FLYFN_METRICS_PORT")
    else None,
    "GROUPS": {
        "default": {
            "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 1024},
            "autostop": "stop",
            "env": [
                "DEBUG",
                "ALLOWED_HOSTS",
                "CSRF_TRUSTED_ORIGINS",
                "LOG_LEVEL",
                "FLYFN_METRICS_PORT",
            ],
            # A new value (fly secrets set) makes the app Machines update the function Machines,
            # which Fly gives API-created Machines only at their next start or update.
            "secrets": ["DATABASE_URL"],
        },
        # Sales reports (background tasks) are drawn on Machines of their own.
        "reports": {
            "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 1024},
            "autostop": "stop",
            "env": ["DEBUG", "ALLOWED_HOSTS", "CSRF_TRUSTED_ORIGINS", "LOG_LEVEL"],
        },
    },
}

# Two uvicorn workers per Machine (the Dockerfile's CMD): prometheus-client records each worker's
# values in one directory per Machine, and the worker that binds the metrics port serves their sum
# (otherwise Fly's scraper would see one worker's). Set before prometheus-client is imported; the
# Machine's own directory is fresh at each boot (/dev/shm is a tmpfs; `flyfn dev` removes it when
# the Machine stops).
if FLYFN["METRICS_PORT"] and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    METRICS_DIR = machine_dir(os.environ.get("FLY_MACHINE_ID"), "metrics")
    if METRICS_DIR is not None:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(METRICS_DIR)

# Background tasks (the monthly sales report) run on function Machines of the "reports" group.
TASKS = {
    "default": {
        "BACKEND": "flyfn.tasks.FlyMachinesBackend",
        "QUEUES": ["default", "reports"],
        # Reports are never scheduled ahead: one scheduled beyond the 15-minute horizon would
        # run at the group's next wake (every app Machine may be stopped; fly.toml's
        # min_machines_running is 0).
        "OPTIONS": {"group": "reports", "beyond_horizon": "next_wake"},
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    # httpx logs every Machines API call at INFO: too chatty next to the route log lines.
    "loggers": {name: {"level": "WARNING"} for name in ("httpx", "httpcore")},
}
