"""PDF receipts with reportlab: purchases read by one streamed SQL query, drawn one page each."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from itertools import groupby
from operator import itemgetter
from typing import IO

from django.db.models import QuerySet
from reportlab.lib.pagesizes import A5
from reportlab.pdfbase.pdfmetrics import stringWidth
from reportlab.pdfgen.canvas import Canvas

from store.models import Purchase, purchase_number

STORE_NAME = "flyfn demo store"
STORE_ADDRESS = "1 Replay Street, Machine City"
CURRENCY = "$"

# One row per purchase item (a purchase without items gives one row of None items), joined to
# its product: the whole bundle is a single query, read in chunks.
_ROW_FIELDS = (
    "id",
    "customer",
    "created_at",
    "items__quantity",
    "items__unit_price",
    "items__product__name",
    "items__product__sku",
)
_ROW_CHUNK = 2000


@dataclass(frozen=True, slots=True)
class ReceiptLine:
    product: str
    sku: str
    quantity: int
    unit_price: Decimal

    @property
    def total(self) -> Decimal:
        return self.unit_price * self.quantity


@dataclass(frozen=True, slots=True)
class Receipt:
    pk: int
    customer: str
    created_at: datetime
    lines: tuple[ReceiptLine, ...]

    @property
    def number(self) -> str:
        return purchase_number(self.pk)

    @property
    def total(self) -> Decimal:
        return sum((line.total for line in self.lines), Decimal("0.00"))


def iter_receipts(purchases: QuerySet[Purchase]) -> Iterator[Receipt]:
    """Yield the receipts of `purchases` in purchase-number order, holding one at a time."""
    rows = (
        purchases.order_by("id", "items__id")
        .values_list(*_ROW_FIELDS)
        .iterator(chunk_size=_ROW_CHUNK)
    )
    for _pk, group in groupby(rows, key=itemgetter(0)):
        first, *rest = group
        pk, customer, created_at = first[0], first[1], first[2]
        lines = tuple(
            ReceiptLine(product=row[5], sku=row[6], quantity=row[3], unit_price=row[4])
            for row in (first, *rest)
            if row[3] is not None
        )
        yield Receipt(pk=pk, customer=customer, created_at=created_at, lines=lines)


def money(value: Decimal) -> str:
    return f"{CURRENCY}{value:,.2f}"


# Layout (points) of an A5 page, drawn directly on the canvas: a flowable layout engine would be
# several times slower for a table this simple.
_WIDTH, _HEIGHT = float(A5[0]), float(A5[1])
_MARGIN = 36.0
_ROW = 15.0
_COL_QTY = 262.0  # right edges of the number columns
_COL_UNIT = 322.0
_COL_TOTAL = _WIDTH - _MARGIN
_PRODUCT_WIDTH = 190.0
_TABLE_BOTTOM = 90.0  # rows stop here; the total and the footer live below


class ReceiptWriter:
    """Draws receipts on one PDF canvas written to `out` (call `close()` to finish the file)."""

    def __init__(self, out: IO[bytes], *, machine: str, title: str = "Receipts") -> None:
        self._canvas = Canvas(out, pagesize=A5, pageCompression=1)
        self._canvas.setTitle(title)
        self._canvas.setAuthor(STORE_NAME)
        self._canvas.setCreator("flyfn demo store (reportlab)")
        self._machine = machine
        self.pages = 0

    def draw(self, receipt: Receipt) -> None:
        """Draw `receipt` on a new page (more pages only if its items overflow one)."""
        y = self._begin_page(receipt, continued=False)
        for line in receipt.lines:
            if y < _TABLE_BOTTOM:
                self._end_page()
                y = self._begin_page(receipt, continued=True)
            y = self._draw_line(line, y)
        self._draw_total(receipt, y)
        self._end_page()

    def draw_empty(self) -> None:
        """A page saying there is nothing to print (a PDF needs at least one page)."""
        c = self._canvas
        self._draw_header()
        c.setFont("Helvetica", 11)
        c.drawString(_MARGIN, _HEIGHT - 130, "No purchases yet.")
        self._end_page()

    def close(self) -> None:
        self._canvas.save()

    def _draw_header(self) -> None:
        c = self._canvas
        c.setFont("Helvetica-Bold", 16)
        c.drawString(_MARGIN, _HEIGHT - 50, STORE_NAME)
        c.setFont("Helvetica", 9)
        c.drawString(_MARGIN, _HEIGHT - 64, STORE_ADDRESS)
        c.line(_MARGIN, _HEIGHT - 74, _WIDTH - _MARGIN, _HEIGHT - 74)

    def _begin_page(self, receipt: Receipt, *, continued: bool) -> float:
        c = self._canvas
        self._draw_header()
        c.setFont("Helvetica-Bold", 12)
        suffix = " (continued)" if continued else ""
        c.drawString(_MARGIN, _HEIGHT - 96, f"Receipt {receipt.number}{suffix}")
        c.setFont("Helvetica", 10)
        c.drawString(_MARGIN, _HEIGHT - 112, f"Date: {receipt.created_at:%Y-%m-%d %H:%M} UTC")
        c.drawString(_MARGIN, _HEIGHT - 126, f"Customer: {receipt.customer}")
        y = _HEIGHT - 154
        c.setFont("Helvetica-Bold", 10)
        c.drawString(_MARGIN, y, "Product")
        c.drawRightString(_COL_QTY, y, "Qty")
        c.drawRightString(_COL_UNIT, y, "Unit price")
        c.drawRightString(_COL_TOTAL, y, "Line total")
        c.line(_MARGIN, y - 5, _WIDTH - _MARGIN, y - 5)
        c.setFont("Helvetica", 10)
        return y - _ROW - 3

    def _draw_line(self, line: ReceiptLine, y: float) -> float:
        c = self._canvas
        c.drawString(_MARGIN, y, _fit(line.product, _PRODUCT_WIDTH))
        c.drawRightString(_COL_QTY, y, str(line.quantity))
        c.drawRightString(_COL_UNIT, y, money(line.unit_price))
        c.drawRightString(_COL_TOTAL, y, money(line.total))
        return y - _ROW

    def _draw_total(self, receipt: Receipt, y: float) -> None:
        c = self._canvas
        y += 4  # just under the last row
        c.line(_MARGIN, y, _WIDTH - _MARGIN, y)
        c.setFont("Helvetica-Bold", 11)
        c.drawString(_MARGIN, y - 16, "Total")
        c.drawRightString(_COL_TOTAL, y - 16, money(receipt.total))

    def _end_page(self) -> None:
        c = self._canvas
        c.setFont("Helvetica-Oblique", 8)
        c.drawString(_MARGIN, 30, f"generated on Machine {self._machine}")
        c.showPage()
        self.pages += 1


def write_receipts(
    receipts: Iterable[Receipt], out: IO[bytes], *, machine: str, title: str = "Receipts"
) -> int:
    """Write a PDF of `receipts` (one page each) to `out`; return the number of pages."""
    writer = ReceiptWriter(out, machine=machine, title=title)
    drawn = 0
    for receipt in receipts:
        writer.draw(receipt)
        drawn += 1
    if not drawn:
        writer.draw_empty()
    writer.close()
    return writer.pages


def _fit(text: str, width: float) -> str:
    # Cut long product names with an ellipsis rather than letting them run into the numbers.
    if float(stringWidth(text, "Helvetica", 10)) <= width:
        return text
    while text and stringWidth(text + "...", "Helvetica", 10) > width:
        text = text[:-1]
    return text + "..."
