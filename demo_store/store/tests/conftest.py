"""Fixtures of the store tests: builders of purchases, PDF text, a clean Machine id."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from io import BytesIO
from pathlib import Path

import pytest
from pypdf import PdfReader
from pytest_django.fixtures import Settings

from flyfn import machine_role
from store.models import Product, Purchase, PurchaseItem

MakePurchase = Callable[[str, list[tuple[str, int, str]]], Purchase]

# Tests run with DEBUG off and no collectstatic: plain static storage instead of the manifest.
PLAIN_STATIC = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}


@pytest.fixture(autouse=True)
def _plain_static_files(settings: Settings, tmp_path: Path) -> None:
    settings.STORAGES = PLAIN_STATIC
    settings.STATIC_ROOT = tmp_path  # WhiteNoise warns about a missing STATIC_ROOT


@pytest.fixture(autouse=True)
def _off_fly(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Start every test off Fly (tests that want a Machine use `on_machine`)."""
    for name in ("FLY_APP_NAME", "FLY_MACHINE_ID", "FLY_ALLOC_ID", "FLYFN_GROUP"):
        monkeypatch.delenv(name, raising=False)
    machine_role.reset()  # flyfn caches what it read from the environment
    yield
    machine_role.reset()


@pytest.fixture
def on_machine(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Call with a Machine id to make this process look like that Machine's (as far as pages and
    receipts tell: flyfn's role stays local, so the views run here)."""

    def set_machine(machine_id: str) -> None:
        monkeypatch.setenv("FLY_MACHINE_ID", machine_id)
        machine_role.reset()

    return set_machine


@pytest.fixture
def make_purchase(db: None) -> MakePurchase:
    """Build a purchase of (product name, quantity, unit price) items, dated 2025-03-04 05:06."""

    def make(customer: str, items: list[tuple[str, int, str]]) -> Purchase:
        purchase = Purchase.objects.create(
            customer=customer, created_at=datetime(2025, 3, 4, 5, 6, tzinfo=UTC)
        )
        for name, quantity, price in items:
            product, _ = Product.objects.get_or_create(
                sku=name.upper()[:32], defaults={"name": name, "price": Decimal(price)}
            )
            PurchaseItem.objects.create(
                purchase=purchase, product=product, quantity=quantity, unit_price=Decimal(price)
            )
        return purchase

    return make


def pdf_pages(data: bytes) -> list[str]:
    """The text of each page of the PDF `data`."""
    assert data.startswith(b"%PDF-"), data[:20]
    return [page.extract_text() for page in PdfReader(BytesIO(data)).pages]
