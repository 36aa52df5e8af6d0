"""seed_store: deterministic, idempotent, incremental."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from store.models import Product, Purchase, PurchaseItem

pytestmark = pytest.mark.django_db

Snapshot = list[tuple[str, str, tuple[tuple[str, int, str], ...]]]


def snapshot() -> Snapshot:
    """The store's purchases without primary keys, oldest first."""
    return [
        (
            p.customer,
            p.created_at.isoformat(),
            tuple((i.product.sku, i.quantity, str(i.unit_price)) for i in p.items.all()),
        )
        for p in Purchase.objects.order_by("created_at", "id").prefetch_related("items__product")
    ]


def products() -> list[tuple[str, str, str]]:
    return [(p.sku, p.name, str(p.price)) for p in Product.objects.order_by("sku")]


def run_seed(*args: str) -> str:
    out = StringIO()
    call_command("seed_store", *args, stdout=out)
    return out.getvalue()


def delete_everything() -> None:
    PurchaseItem.objects.all().delete()
    Purchase.objects.all().delete()
    Product.objects.all().delete()


def test_creates_the_requested_purchases_with_items() -> None:
    assert "created 30 purchases" in run_seed("--purchases", "30")
    assert Purchase.objects.count() == 30
    assert Product.objects.count() == 12
    assert not Purchase.objects.filter(items__isnull=True).exists()
    assert PurchaseItem.objects.filter(quantity__gt=1).exists()
    assert len({customer for customer, _, _ in snapshot()}) > 5


def test_running_again_changes_nothing() -> None:
    run_seed("--purchases", "30")
    before, catalogue = snapshot(), products()
    assert "created 0 purchases" in run_seed("--purchases", "30")
    assert snapshot() == before
    assert products() == catalogue


def test_same_data_on_every_fresh_database() -> None:
    run_seed("--purchases", "20")
    first, catalogue = snapshot(), products()
    delete_everything()
    run_seed("--purchases", "20")
    assert snapshot() == first
    assert products() == catalogue


def test_growing_in_steps_equals_seeding_at_once() -> None:
    run_seed("--purchases", "25")
    at_once = snapshot()
    delete_everything()
    run_seed("--purchases", "10")
    run_seed("--purchases", "25")
    assert snapshot() == at_once


def test_if_empty_leaves_a_store_with_purchases_alone() -> None:
    Purchase.objects.create(customer="Someone")
    run_seed("--purchases", "25", "--if-empty")
    assert Purchase.objects.count() == 1
    run_seed("--purchases", "25")
    assert Purchase.objects.count() == 25


def test_negative_count_is_an_error() -> None:
    with pytest.raises(CommandError, match="0 or more"):
        run_seed("--purchases", "-1")
