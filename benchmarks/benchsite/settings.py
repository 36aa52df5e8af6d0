"""Settings of the benchmark project; env BENCH_MIDDLEWARE picks none | flyfn | blog."""

from __future__ import annotations

import os

SECRET_KEY = "flyfn-benchmarks-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "benchmarks.benchsite.urls"
INSTALLED_APPS = ["flyfn"]
DATABASES: dict[str, dict[str, str]] = {}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
LOGGING_CONFIG = None  # benchmarks keep Django's default logging out of the timed path

MIDDLEWARE_SETS: dict[str, list[str]] = {
    "none": [],
    "flyfn": ["flyfn.middleware.FlyReplayMiddleware"],
    "blog": ["benchmarks.baseline_blog.BlogServerlessMiddleware"],
}
BENCH_MIDDLEWARE = os.environ.get("BENCH_MIDDLEWARE", "flyfn")
MIDDLEWARE = MIDDLEWARE_SETS[BENCH_MIDDLEWARE]

# The blog's setting, read by the blog's middleware (flyfn finds the view by its decorator).
if BENCH_MIDDLEWARE == "blog":
    FLY_MACHINES_SERVERLESS_FUNCTIONS = [("bench:fn", ("GET",))]

ELASTIC_CONCURRENCY = {"soft_limit": 10, "hard_limit": 15}
FLYFN = {
    # One function Machine for the default group, stopped when idle (as the blog's).
    "GROUPS": {
        "default": {"machines": 1, "autostop": "stop"},
        # The elastic benchmark: Machines of 10 requests each (a hard limit above the soft one
        # leaves room for the answers that send requests on), at most 5 of them, or fixed at 1.
        "elastic": {"max_machines": 5, "concurrency": ELASTIC_CONCURRENCY, "replay_timeout": "60s"},
        "fixed": {"machines": 1, "concurrency": ELASTIC_CONCURRENCY, "replay_timeout": "60s"},
        "trickle": {"max_machines": 5, "concurrency": ELASTIC_CONCURRENCY},
        # The regions benchmark: `default` follows the caller, this one stays in the primary.
        "primary": {"machines": 1, "autostop": "stop", "regions": "primary"},
        # The keep_warm benchmark: the same view scaled to zero, or with one Machine kept warm.
        "cold": {"replay_timeout": "60s"},
        "warm": {"replay_timeout": "60s", "keep_warm": 1},
    },
}
