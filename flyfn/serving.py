"""The `serving_started` signal: a process has begun serving requests (never a management command).

Django has no such signal; flyfn's middleware sends it as a handler loads it, which a web server's
worker does once as it boots, before its first request. A receiver that must run on a Machine even
if no request ever reaches it (a task group's keeper, which stops a Machine launched for nothing)
connects here rather than to `request_started`. Receivers must be idempotent: a process may build
more than one handler.
"""

from __future__ import annotations

from django.dispatch import Signal

__all__ = ["serving_started"]

serving_started = Signal()
