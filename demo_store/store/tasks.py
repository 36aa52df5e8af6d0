"""The store's background tasks (flyfn.tasks runs them on the `reports` group's Machines)."""

from __future__ import annotations

from io import BytesIO

from store.machine import current_machine
from store.models import SalesReport
from store.sales_report import month_receipts, write_sales_report

try:
    from django.tasks import task
except ImportError:  # Django 5.2: the django-tasks backport
    from django_tasks import task  # type: ignore[no-redef]


@task(queue_name="reports")
def build_sales_report(report_id: int) -> dict[str, object]:
    """Draw the report's PDF and keep it in the database; its pages and the Machine."""
    report = SalesReport.objects.get(pk=report_id)
    out = BytesIO()
    machine = current_machine()
    pages = write_sales_report(report.month, month_receipts(report.month), out, machine=machine)
    report.pdf, report.pages, report.machine = out.getvalue(), pages, machine
    report.save(update_fields=["pdf", "pages", "machine"])
    return {"pages": pages, "machine": machine}
