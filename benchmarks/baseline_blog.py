"""The baseline: the Fly.io blog's serverless-views middleware, re-implemented to be measured.

Django Beats, "Django Views as Serverless Functions on Fly Machines" (January 2024) routes chosen
views to a separate Fly Machine with a middleware that, for every request:

1. resolves the request path itself (a second URL resolution, before Django's own);
2. checks the resolved `namespace:url_name` and the method against the
   `FLY_MACHINES_SERVERLESS_FUNCTIONS` setting, unless it runs on the serverless Machine
   (env `IS_FLY_MACHINE_SERVERLESS`);
3. for a serverless view, lists *all* Machines of the app through the Machines API, picks the one
   carrying its metadata, or creates one (with that metadata, the same image, and a service that
   Fly Proxy autostarts and autostops); there is no lock and no cache, so concurrent first requests
   each create their own Machine;
4. answers with an empty response carrying `fly-replay: instance=<machine id>`.

The API calls are synchronous `requests` calls with a fresh connection each, as in the post. The
one addition is a timeout on each call, so that a benchmark run is bounded in time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import requests
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.urls import resolve

METADATA_KEY = "fly_serverless_function"
SERVERLESS_ENV = "IS_FLY_MACHINE_SERVERLESS"
CALL_TIMEOUT = 10.0  # not in the post; keeps a benchmark bounded


class BlogMachinesApi:
    """The post's module-level helpers: environment read once, plain `requests` calls."""

    def __init__(self) -> None:
        self.hostname = os.environ.get("FLY_API_HOSTNAME", "https://api.machines.dev")
        self.app_name = os.environ.get("FLY_APP_NAME", "")
        self.image_ref = os.environ.get("FLY_IMAGE_REF", "")
        self._headers = {
            "Authorization": f"Bearer {os.environ.get('FLY_API_TOKEN', '')}",
            "Content-Type": "application/json",
        }

    def __repr__(self) -> str:  # never show the token
        return f"BlogMachinesApi(hostname={self.hostname!r}, app_name={self.app_name!r})"

    @property
    def machines_url(self) -> str:
        return f"{self.hostname}/v1/apps/{self.app_name}/machines"

    def list_machines(self) -> list[dict[str, Any]]:
        response = requests.get(self.machines_url, headers=self._headers, timeout=CALL_TIMEOUT)
        response.raise_for_status()
        machines: list[dict[str, Any]] = response.json()
        return machines

    def create_machine(self) -> dict[str, Any]:
        body = {
            "config": {
                "image": self.image_ref,
                "env": {SERVERLESS_ENV: "true"},
                "metadata": {METADATA_KEY: "true"},
                "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 512},
                "services": [
                    {
                        "protocol": "tcp",
                        "internal_port": 8000,
                        "autostart": True,
                        "autostop": True,
                        "ports": [
                            {"port": 80, "handlers": ["http"], "force_https": True},
                            {"port": 443, "handlers": ["tls", "http"]},
                        ],
                    }
                ],
            }
        }
        response = requests.post(
            self.machines_url, headers=self._headers, json=body, timeout=CALL_TIMEOUT
        )
        response.raise_for_status()
        machine: dict[str, Any] = response.json()
        return machine

    def get_or_create_machine(self) -> str:
        """The id of the serverless Machine; list everything, create when none matches (no lock)."""
        for machine in self.list_machines():
            metadata = (machine.get("config") or {}).get("metadata") or {}
            if metadata.get(METADATA_KEY) == "true":
                machine_id: str = machine["id"]
                return machine_id
        created: str = self.create_machine()["id"]
        return created


class BlogServerlessMiddleware:
    """The post's middleware, as a plain callable middleware (sync only, as in the post)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response
        self.api = BlogMachinesApi()

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if os.environ.get(SERVERLESS_ENV) != "true":
            match = resolve(request.path_info)
            functions: list[tuple[str, tuple[str, ...]]] = getattr(
                settings, "FLY_MACHINES_SERVERLESS_FUNCTIONS", []
            )
            for view_name, methods in functions:
                if match.view_name == view_name and request.method in methods:
                    machine_id = self.api.get_or_create_machine()
                    response = HttpResponse()
                    response["fly-replay"] = f"instance={machine_id}"
                    return response
        return self.get_response(request)
