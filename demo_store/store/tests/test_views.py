"""Store pages: redirect, purchases list (SQL totals, constant queries), detail, Machine note."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from pytest_django.asserts import assertContains, assertNotContains

from flyfn import machine_role
from flyfn.registry import registry
from store import views
from store.management.commands.seed_store import seed
from store.models import Purchase
from store.tests.conftest import MakePurchase
from store.views import PAGE_SIZE, purchases_with_totals

pytestmark = pytest.mark.django_db


def test_root_redirects_to_purchases(client: Client) -> None:
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == "/purchases/"


def test_list_shows_each_purchase_with_its_links_and_total(
    client: Client, make_purchase: MakePurchase
) -> None:
    purchase = make_purchase("Margaret Hamilton", [("Tea", 3, "2.50"), ("Cake", 1, "4.10")])
    response = client.get("/purchases/")
    for expected in (
        purchase.number,
        "Margaret Hamilton",
        "2025-03-04 05:06",
        "$11.60",
        f'href="/purchases/{purchase.pk}/receipt.pdf"',
        f'href="/purchases/{purchase.pk}/"',
        'href="/purchases/receipts.pdf"',
        "All 1 receipt (one PDF)",
    ):
        assertContains(response, expected)


def test_totals_are_computed_by_the_database() -> None:
    seed(15)
    with CaptureQueriesContext(connection) as queries:
        totals = {p.pk: p.total for p in purchases_with_totals()}  # type: ignore[attr-defined]
    assert len(queries) == 1
    for purchase in Purchase.objects.prefetch_related("items"):
        assert totals[purchase.pk] == sum((i.line_total for i in purchase.items.all()), Decimal(0))


def test_list_query_count_does_not_grow_with_purchases(client: Client) -> None:
    def queries_for_list() -> int:
        with CaptureQueriesContext(connection) as queries:
            assert client.get("/purchases/").status_code == 200
        return len(queries)

    seed(10)
    small = queries_for_list()
    seed(200)
    assert queries_for_list() == small


def test_list_is_paginated_newest_first(client: Client) -> None:
    seed(PAGE_SIZE + 5)
    newest = Purchase.objects.order_by("-created_at").first()
    oldest = Purchase.objects.order_by("created_at").first()
    assert newest is not None
    assert oldest is not None
    first = client.get("/purchases/")
    assertContains(first, f'href="/purchases/{newest.pk}/"')
    assertNotContains(first, f'href="/purchases/{oldest.pk}/"')
    assertContains(first, "Page 1 of 2")
    assertContains(client.get("/purchases/?page=2"), f'href="/purchases/{oldest.pk}/"')


def test_empty_store_page_says_how_to_seed(client: Client) -> None:
    assertContains(client.get("/purchases/"), "seed_store")


def test_detail_page_lists_items_and_total(client: Client, make_purchase: MakePurchase) -> None:
    purchase = make_purchase("Radia Perlman", [("Tea", 3, "2.50"), ("Cake", 1, "4.10")])
    response = client.get(f"/purchases/{purchase.pk}/")
    for expected in ("Radia Perlman", "Tea", "Cake", "$7.50", "$4.10", "$11.60"):
        assertContains(response, expected)
    assertContains(response, f'href="/purchases/{purchase.pk}/receipt.pdf"')
    assert client.get("/purchases/999999/").status_code == 404


def test_page_names_its_machine_and_says_receipts_run_elsewhere(
    client: Client, on_machine: Callable[[str], None]
) -> None:
    on_machine("3d8d9e1c2e5789")
    response = client.get("/purchases/")
    assertContains(response, 'data-machine="3d8d9e1c2e5789"')
    assertContains(response, "generated on another Machine")


def test_page_off_fly_says_local(client: Client) -> None:
    response = client.get("/purchases/")
    assertContains(response, 'data-machine="local"')
    assertContains(response, "generated in this same process")


def test_pages_only_answer_safe_methods(client: Client) -> None:
    assert client.post("/purchases/").status_code == 405
    assert client.head("/purchases/").status_code == 200


def test_receipt_views_and_only_they_are_serverless() -> None:
    for serverless in (views.purchase_receipt, views.all_receipts):
        marked = registry.lookup(serverless)
        assert marked is not None
        assert marked.group == "default"
        assert "GET" in marked.methods
        assert "POST" not in marked.methods
    for page in (views.purchase_list, views.purchase_detail):
        assert registry.lookup(page) is None


def test_on_a_function_machine_pages_are_sent_elsewhere(client: Client) -> None:
    # The demo's MIDDLEWARE has flyfn's router: a function Machine never serves store pages.
    with machine_role.override_role(machine_role.function("default")):
        response = client.get("/purchases/")
    assert "elsewhere=true" in response["fly-replay"]
