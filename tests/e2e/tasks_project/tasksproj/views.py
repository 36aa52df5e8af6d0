"""Views of the e2e tasks project: enqueue from the app Machine, read the results."""

from __future__ import annotations

import json
import os
from datetime import timedelta

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.utils import timezone

from .tasks import nap, work


def enqueue(request: HttpRequest, n: int) -> JsonResponse:
    with transaction.atomic():  # delivered once, after the commit
        ids = [work.enqueue(i).id for i in range(n)]
    return JsonResponse({"ids": ids, "machine": os.environ.get("FLY_MACHINE_ID")})


def enqueue_naps(request: HttpRequest, n: int, deferred: int, seconds: int) -> JsonResponse:
    """`n` naps due now and `deferred` naps due in `seconds` seconds, in one transaction."""
    at = timezone.now() + timedelta(seconds=seconds)
    with transaction.atomic():
        ids = [nap.enqueue(i).id for i in range(n)]
        later = [nap.using(run_after=at).enqueue(n + i).id for i in range(deferred)]
    return JsonResponse(
        {"ids": ids, "deferred": later, "machine": os.environ.get("FLY_MACHINE_ID")}
    )


def results(request: HttpRequest) -> JsonResponse:
    ids = json.loads(request.body or b"[]")
    found = []
    for task_id in ids:
        result = work.get_result(task_id)
        found.append(
            {
                "id": result.id,
                "status": str(result.status),
                "worker_ids": result.worker_ids,
                "value": result.return_value if result.status == "SUCCESSFUL" else None,
                "errors": [e.traceback for e in result.errors],
            }
        )
    return JsonResponse({"results": found})
