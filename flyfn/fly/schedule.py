"""Fly's Machine `schedule` (`config.schedule`): the intervals Fly starts a scheduled Machine on,
and about how long each is.

A Machine created with a schedule is started by the platform once per interval, whatever state
its app's other Machines are in; it runs its command and stops when that exits.
"""

from __future__ import annotations

__all__ = ["INTERVALS", "period"]

# Seconds per interval (a month counted as 30 days: Fly says no more than "monthly").
INTERVALS: dict[str, float] = {
    "hourly": 3600.0,
    "daily": 86400.0,
    "weekly": 7 * 86400.0,
    "monthly": 30 * 86400.0,
}


def period(interval: str) -> float:
    """Seconds between two starts of a Machine scheduled `interval`; KeyError for another name."""
    return INTERVALS[interval]
