"""Timestamps as the Machines API writes them (`created_at`, `updated_at`: RFC 3339 such as
`2026-12-07T03:00:00Z`), read as Unix seconds."""

from __future__ import annotations

from datetime import datetime

__all__ = ["unix_seconds"]


def unix_seconds(text: str | None) -> float | None:
    """`text` in Unix seconds; None when it is missing or not a timestamp (the figures that use
    it then fall back, never fail)."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
