"""The database's clock: due times and leases are compared with it, never with a Machine's.

Machines' clocks drift apart (a few seconds are common); the database is the one clock every
Machine shares. Filters use `Now()` (evaluated by the database); where a number of seconds is
needed (how long to sleep), `db_now()` reads the database's time once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from django.db import connections
from django.db.models import Q
from django.db.models.expressions import CombinedExpression, Value
from django.db.models.fields import DateTimeField
from django.db.models.functions import Now
from django.utils import timezone
from django_tasks_db.compat import TaskResultStatus
from django_tasks_db.models import DBTaskResultQuerySet, get_date_max

__all__ = ["db_now", "due", "in_seconds"]


def db_now(using: str = "default") -> datetime:
    """The database's current time (timezone-aware UTC when `USE_TZ`)."""
    connection = connections[using]
    vendor = connection.vendor
    if vendor == "sqlite":
        sql = "SELECT STRFTIME('%Y-%m-%d %H:%M:%f', 'NOW')"
    elif vendor == "mysql":
        sql = "SELECT UTC_TIMESTAMP(6)"
    elif vendor == "postgresql":
        sql = "SELECT STATEMENT_TIMESTAMP()"
    else:  # a database without a known clock query: this Machine's clock
        return timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(sql)
        (value,) = cursor.fetchone()
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        return timezone.now()
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def due(rows: DBTaskResultQuerySet) -> DBTaskResultQuerySet:
    """django-tasks-db's `ready()` on the database's clock: READY and not scheduled later."""
    return rows.filter(status=TaskResultStatus.READY).filter(
        Q(run_after=get_date_max()) | Q(run_after__lte=Now())
    )


def in_seconds(seconds: float) -> CombinedExpression:
    """The database's time `seconds` from now, for a lease's expiry."""
    return CombinedExpression(
        Now(), "+", Value(timedelta(seconds=seconds)), output_field=DateTimeField()
    )
