"""Store pages (purchases list and detail) and the two receipt views that run on Fly functions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from io import BytesIO
from tempfile import SpooledTemporaryFile

from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import DecimalField, F, QuerySet, Sum, Value
from django.db.models.functions import Coalesce
from django.http import (
    FileResponse,
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    StreamingHttpResponse,
)
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST, require_safe
from django_tasks_db.compat import TaskResultDoesNotExist, TaskResultStatus

from flyfn import fly_serverless
from store.machine import current_machine
from store.models import Purchase, SalesReport, purchase_number
from store.receipts import iter_receipts, write_receipts
from store.streaming import file_response
from store.tasks import build_sales_report

PAGE_SIZE = 50
REPORTS_SHOWN = 5
# Anyone may ask for a report (the demo has no accounts), so asking is bounded: one report is
# drawn at a time. A report left queued or running longer than this no longer blocks the next one
# (its task was lost, say), so at worst one report is queued per window. (Requests at the same
# instant may each queue one: as many as arrive together, no more.)
REPORT_PENDING_WINDOW = timedelta(minutes=10)
# The bundle stays in memory up to this size, then spills to a temporary file.
SPOOL_MAX_BYTES = 8 * 1024 * 1024
_MONEY = DecimalField(max_digits=14, decimal_places=2)


def purchases_with_totals() -> QuerySet[Purchase]:
    """Purchases annotated with their `total`, summed by the database."""
    purchases: QuerySet[Purchase] = Purchase.objects.order_by("-created_at", "-id").annotate(
        total=Coalesce(
            Sum(F("items__quantity") * F("items__unit_price"), output_field=_MONEY),
            Value(Decimal("0.00")),
            output_field=_MONEY,
        ),
    )
    return purchases


@require_safe
def purchase_list(request: HttpRequest) -> HttpResponse:
    # Two queries whatever the page: the count and the page's rows with their totals.
    paginator = Paginator(purchases_with_totals(), PAGE_SIZE)
    page = paginator.get_page(request.GET.get("page"))
    months = list(Purchase.objects.dates("created_at", "month", order="DESC"))
    reports = [(r, report_state(r)) for r in SalesReport.objects.defer("pdf")[:REPORTS_SHOWN]]
    context = {
        "page": page,
        "paginator": paginator,
        "months": months,
        "reports": reports,
        "reports_pending": any(state.pending for _, state in reports),
    }
    return render(request, "store/purchase_list.html", context)


@dataclass(frozen=True, slots=True)
class ReportState:
    """What the store page says about a report's task."""

    label: str  # queued, running on Machine X, done, failed
    pending: bool
    done: bool


def report_state(report: SalesReport) -> ReportState:
    try:
        result = build_sales_report.get_result(report.task_id)
    except TaskResultDoesNotExist:
        return ReportState("unknown", pending=False, done=False)
    if result.status == TaskResultStatus.SUCCESSFUL:
        return ReportState("done", pending=False, done=True)
    if result.status == TaskResultStatus.FAILED:
        return ReportState("failed", pending=False, done=False)
    if result.status == TaskResultStatus.RUNNING and result.worker_ids:
        return ReportState(f"running on Machine {result.worker_ids[-1]}", pending=True, done=False)
    return ReportState("queued", pending=True, done=False)


def pending_report() -> SalesReport | None:
    """The report being drawn (queued or running) within the pending window, if any."""
    since = timezone.now() - REPORT_PENDING_WINDOW
    recent = SalesReport.objects.filter(pdf=None, requested_at__gte=since).defer("pdf")
    return next((r for r in recent if report_state(r).pending), None)


@require_POST
def request_sales_report(request: HttpRequest) -> HttpResponse:
    """Queue the sales report of the month chosen on the store page, one report at a time: while
    one is queued or running, asking for the same month again changes nothing, and for another
    month is answered 429 (visitors are anonymous: nothing else bounds what they queue)."""
    try:
        month = date.fromisoformat(request.POST.get("month", "") + "-01")
    except ValueError:
        return HttpResponseBadRequest("month: expected YYYY-MM", content_type="text/plain")
    page = reverse("store:purchase_list") + "#reports"
    with transaction.atomic():  # the task is delivered once the report row is committed
        pending = pending_report()
        if pending is not None and pending.month == month:
            return redirect(page)
        if pending is not None:
            response = HttpResponse(
                f"The report of {pending.month:%B %Y} is being drawn: ask again when it is done.",
                status=429,
                content_type="text/plain",
            )
            response["Retry-After"] = "30"
            return response
        report = SalesReport.objects.create(month=month)
        report.task_id = build_sales_report.enqueue(report.pk).id
        report.save(update_fields=["task_id"])
    return redirect(page)


@require_safe
def sales_report_pdf(request: HttpRequest, pk: int) -> HttpResponse:
    """A finished report's PDF, from the database (any Machine can serve it)."""
    report = get_object_or_404(SalesReport.objects.exclude(pdf=None), pk=pk)
    response = HttpResponse(bytes(report.pdf or b""), content_type="application/pdf")
    response["Content-Disposition"] = f'inline; filename="sales-{report.month:%Y-%m}.pdf"'
    return response


@require_safe
def purchase_detail(request: HttpRequest, pk: int) -> HttpResponse:
    purchase = get_object_or_404(purchases_with_totals(), pk=pk)
    items = purchase.items.select_related("product")
    return render(request, "store/purchase_detail.html", {"purchase": purchase, "items": items})


# The PDFs are drawn on the default group's function Machines (flyfn replays these two views there
# from the app Machines); pages and the admin stay on the app Machines.
@fly_serverless(methods=["GET"])
@require_safe
def purchase_receipt(request: HttpRequest, pk: int) -> HttpResponse:
    """One purchase's receipt (a few KB, built in memory)."""
    receipts = list(iter_receipts(Purchase.objects.filter(pk=pk)))
    if not receipts:
        raise Http404("No such purchase")
    buffer = BytesIO()
    title = f"Receipt {purchase_number(pk)}"
    write_receipts(receipts, buffer, machine=current_machine(), title=title)
    response = HttpResponse(buffer.getvalue(), content_type="application/pdf")
    response["Content-Disposition"] = f'inline; filename="receipt-{purchase_number(pk)}.pdf"'
    return response


@fly_serverless(methods=["GET"])
@require_safe
def all_receipts(request: HttpRequest) -> FileResponse | StreamingHttpResponse:
    """Every purchase's receipt in one PDF, one page each: one query, spooled to disk when big."""
    out = SpooledTemporaryFile(max_size=SPOOL_MAX_BYTES)  # noqa: SIM115 (closed by the response)
    try:
        write_receipts(iter_receipts(Purchase.objects.all()), out, machine=current_machine())
    except BaseException:
        out.close()
        raise
    return file_response(request, out, filename="receipts.pdf", content_type="application/pdf")
