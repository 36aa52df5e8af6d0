"""The monthly sales report: requested on the store page, drawn by a background task, followed on
the page (queued, running on Machine X, done) and served from the database."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.test import Client
from django.utils import timezone
from pytest_django.asserts import assertContains

from flyfn.tasks import run_due_tasks
from flyfn.tasks.configured import flyfn_backends
from flyfn.tasks.runner import claim_next, run_claim
from store.models import SalesReport
from store.tests.conftest import MakePurchase, pdf_pages
from store.views import REPORT_PENDING_WINDOW

pytestmark = pytest.mark.django_db


def state_of(client: Client, report: SalesReport) -> str:
    page = client.get("/purchases/").content.decode()
    marker = f'data-report="{report.pk}" data-state="'
    return page.split(marker, 1)[1].split('"', 1)[0]


def test_a_report_is_queued_run_and_served_from_the_database(
    client: Client, make_purchase: MakePurchase, on_machine: Callable[[str], None]
) -> None:
    for n in range(45):  # more than one page of purchases
        make_purchase(f"Customer {n}", [("Tea", 1 + n % 3, "2.50")])
    page = client.get("/purchases/")
    assertContains(page, '<option value="2025-03">March 2025</option>', html=True)

    response = client.post("/purchases/reports/", {"month": "2025-03"})
    assert response.status_code == 302
    assert response["Location"] == "/purchases/#reports"
    report = SalesReport.objects.get()
    assert report.task_id
    assert state_of(client, report) == "queued"
    assertContains(client.get("/purchases/"), 'http-equiv="refresh"')

    backend = flyfn_backends()[0]
    claim = claim_next(backend, "reports", "fn-draws-it")
    assert claim is not None
    assert state_of(client, report) == "running on Machine fn-draws-it"
    on_machine("fn-draws-it")
    assert run_claim(claim) is True
    report.refresh_from_db()
    assert state_of(client, report) == "done"
    assert report.machine == "fn-draws-it"

    pdf = client.get(f"/purchases/reports/{report.pk}.pdf")
    assert pdf["Content-Type"] == "application/pdf"
    pages = pdf_pages(pdf.content)
    assert len(pages) == report.pages == 3  # the totals, then 40 and 5 purchases
    assert "March 2025" in pages[0]
    assert "Purchases: 45" in pages[0]
    assert all("generated on Machine fn-draws-it" in text for text in pages)
    assert "Customer 44" in pages[2]


def test_run_due_tasks_draws_a_report_with_no_purchases(client: Client) -> None:
    client.post("/purchases/reports/", {"month": "2024-02"})
    assert run_due_tasks() == 1
    report = SalesReport.objects.get()
    assert report.pages == 1
    assert "Purchases: 0" in pdf_pages(bytes(report.pdf or b""))[0]


@pytest.mark.parametrize("month", ["", "2025-13", "March", "2025-03-01"])
def test_a_bad_month_is_a_clear_400(client: Client, month: str) -> None:
    response = client.post("/purchases/reports/", {"month": month})
    assert response.status_code == 400
    assert response.content == b"month: expected YYYY-MM"
    assert not SalesReport.objects.exists()


def test_an_unfinished_report_has_no_pdf(client: Client) -> None:
    client.post("/purchases/reports/", {"month": "2025-03"})
    report = SalesReport.objects.get()
    assert client.get(f"/purchases/reports/{report.pk}.pdf").status_code == 404


# ------------------------------------------------------------ one report at a time (issue 23)


def test_asking_again_for_a_pending_month_queues_nothing(client: Client) -> None:
    client.post("/purchases/reports/", {"month": "2025-03"})
    again = client.post("/purchases/reports/", {"month": "2025-03"})
    assert again.status_code == 302
    assert again["Location"] == "/purchases/#reports"
    assert SalesReport.objects.count() == 1


def test_another_month_waits_until_the_pending_report_is_done(client: Client) -> None:
    client.post("/purchases/reports/", {"month": "2025-03"})
    refused = client.post("/purchases/reports/", {"month": "2025-04"})
    assert refused.status_code == 429
    assert refused["Retry-After"] == "30"
    assert b"March 2025 is being drawn" in refused.content
    assert SalesReport.objects.count() == 1

    assert run_due_tasks() == 1  # done: the next one may be queued
    assert client.post("/purchases/reports/", {"month": "2025-04"}).status_code == 302
    assert client.post("/purchases/reports/", {"month": "2025-03"}).status_code == 429
    assert sorted(f"{r.month:%Y-%m}" for r in SalesReport.objects.all()) == [
        "2025-03",
        "2025-04",
    ]


def test_a_report_pending_too_long_no_longer_blocks(client: Client) -> None:
    client.post("/purchases/reports/", {"month": "2025-03"})
    SalesReport.objects.update(requested_at=timezone.now() - REPORT_PENDING_WINDOW * 2)
    assert client.post("/purchases/reports/", {"month": "2025-04"}).status_code == 302
    assert SalesReport.objects.count() == 2
