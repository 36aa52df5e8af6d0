"""Views of the tasks benchmark (on the app Machine): enqueue, and read results."""

from __future__ import annotations

import json
import time

from django.db import transaction
from django.http import HttpRequest, HttpResponseBase, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from .tasks import noop


@csrf_exempt
def enqueue(request: HttpRequest, backend: str, n: int) -> HttpResponseBase:
    """?each=1: n tasks each in its own commit, each timed; otherwise n in one transaction."""
    task = noop.using(backend=backend)
    ids: list[str] = []
    timings_ms: list[float] = []
    if request.GET.get("each"):
        for i in range(n):
            start = time.perf_counter()
            ids.append(task.enqueue(i).id)
            timings_ms.append((time.perf_counter() - start) * 1000)
    else:
        with transaction.atomic():
            ids = [task.enqueue(i).id for i in range(n)]
    return JsonResponse({"ids": ids, "enqueue_ms": timings_ms})


@csrf_exempt
def results(request: HttpRequest) -> HttpResponseBase:
    """Status and times (epoch seconds) of the tasks whose ids are the JSON body."""
    found = []
    for task_id in json.loads(request.body):
        result = noop.get_result(task_id)
        found.append(
            {
                "status": str(result.status),
                "enqueued_at": result.enqueued_at.timestamp() if result.enqueued_at else None,
                "started_at": result.started_at.timestamp() if result.started_at else None,
                "finished_at": result.finished_at.timestamp() if result.finished_at else None,
            }
        )
    return JsonResponse({"results": found})
