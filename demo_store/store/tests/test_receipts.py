"""Receipts: what a receipt says, one page per purchase, and SQL queries independent of size."""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO

import pytest
from django.db import connection
from django.test import AsyncClient, Client
from django.test.utils import CaptureQueriesContext
from pypdf import PdfReader

from store.management.commands.seed_store import seed
from store.models import Purchase
from store.receipts import iter_receipts, write_receipts
from store.tests.conftest import MakePurchase, pdf_pages

pytestmark = pytest.mark.django_db


def render_all() -> tuple[int, bytes]:
    out = BytesIO()
    pages = write_receipts(iter_receipts(Purchase.objects.all()), out, machine="m-test")
    return pages, out.getvalue()


def read_bundle(client: Client) -> tuple[dict[str, str], bytes]:
    response = client.get("/purchases/receipts.pdf")
    assert response.status_code == 200
    data = b"".join(response.streaming_content)  # type: ignore[attr-defined]
    return dict(response.headers), data


def test_receipt_names_purchase_items_total_and_machine(
    client: Client, make_purchase: MakePurchase, on_machine: Callable[[str], None]
) -> None:
    purchase = make_purchase("Ada Lovelace", [("Tea", 3, "2.50"), ("Biscuits", 2, "1.25")])
    on_machine("e286de4f711e86")
    response = client.get(f"/purchases/{purchase.pk}/receipt.pdf")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/pdf"
    assert f'filename="receipt-{purchase.number}.pdf"' in response["Content-Disposition"]
    (text,) = pdf_pages(response.content)
    metadata = PdfReader(BytesIO(response.content)).metadata
    assert metadata is not None
    assert metadata.title == f"Receipt {purchase.number}"
    for expected in (
        f"Receipt {purchase.number}",
        "Date: 2025-03-04 05:06 UTC",
        "Customer: Ada Lovelace",
        "Tea",
        "$7.50",  # 3 x 2.50
        "Biscuits",
        "$1.25",
        "$2.50",
        "Total",
        "$10.00",
        "generated on Machine e286de4f711e86",
    ):
        assert expected in text


def test_footer_says_local_off_fly(client: Client, make_purchase: MakePurchase) -> None:
    purchase = make_purchase("Grace Hopper", [("Tea", 1, "2.50")])
    response = client.get(f"/purchases/{purchase.pk}/receipt.pdf")
    assert "generated on Machine local" in pdf_pages(response.content)[0]


def test_unknown_purchase_is_404(client: Client) -> None:
    assert client.get("/purchases/999999/receipt.pdf").status_code == 404


def test_long_product_names_are_cut_short(make_purchase: MakePurchase) -> None:
    make_purchase("Alan Turing", [("A" * 80, 1, "1.00")])
    text = pdf_pages(render_all()[1])[0]
    assert "AAAA..." in text
    assert "A" * 80 not in text


def test_purchase_without_items_gets_a_page_with_zero_total(make_purchase: MakePurchase) -> None:
    empty = make_purchase("Edsger Dijkstra", [])
    pages, data = render_all()
    assert pages == 1
    text = pdf_pages(data)[0]
    assert f"Receipt {empty.number}" in text
    assert "$0.00" in text


def test_many_items_continue_on_a_second_page(make_purchase: MakePurchase) -> None:
    purchase = make_purchase("Barbara Liskov", [(f"Item {i:02d}", 1, "1.00") for i in range(40)])
    pages, data = render_all()
    assert pages == 2
    first, second = pdf_pages(data)
    assert "Item 00" in first
    assert f"Receipt {purchase.number} (continued)" in second
    assert "Item 39" in second
    assert "$40.00" in second
    assert "Total" not in first


def test_empty_store_gives_one_page_saying_so() -> None:
    pages, data = render_all()
    assert pages == 1
    assert "No purchases yet" in pdf_pages(data)[0]


def test_bundle_has_one_page_per_purchase_in_number_order(client: Client) -> None:
    seed(12)
    headers, data = read_bundle(client)
    assert headers["Content-Type"] == "application/pdf"
    assert 'filename="receipts.pdf"' in headers["Content-Disposition"]
    assert int(headers["Content-Length"]) == len(data)
    pages = pdf_pages(data)
    numbers = [p.number for p in Purchase.objects.order_by("id")]
    assert len(pages) == 12
    for text, number in zip(pages, numbers, strict=True):
        assert f"Receipt {number}" in text
        assert "generated on Machine local" in text


def test_bundle_query_count_does_not_grow_with_purchases(client: Client) -> None:
    def queries_for_bundle() -> int:
        with CaptureQueriesContext(connection) as queries:
            read_bundle(client)
        return len(queries)

    seed(10)
    small = queries_for_bundle()
    seed(200)
    assert queries_for_bundle() == small == 1


def test_single_receipt_is_one_query(client: Client) -> None:
    seed(3)
    pk = Purchase.objects.order_by("id").values_list("pk", flat=True)[2]
    with CaptureQueriesContext(connection) as queries:
        assert client.get(f"/purchases/{pk}/receipt.pdf").status_code == 200
    assert len(queries) == 1


@pytest.mark.django_db(transaction=True)
async def test_asgi_streams_the_bundle_from_an_async_iterator(async_client: AsyncClient) -> None:
    # Under ASGI a sync iterator would be read whole into memory by Django before sending.
    await Purchase.objects.acreate(customer="Ken Thompson")
    response = await async_client.get("/purchases/receipts.pdf")
    assert response.status_code == 200
    assert response.is_async  # type: ignore[attr-defined]
    data = b"".join([chunk async for chunk in response.streaming_content])  # type: ignore[attr-defined]
    assert int(response["Content-Length"]) == len(data)
    assert len(pdf_pages(data)) == 1
