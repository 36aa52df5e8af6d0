"""The monthly sales report PDF (reportlab): a title page with the month's totals, then every
purchase of the month, 40 to a page, each page's footer naming the Machine that drew it."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date
from decimal import Decimal
from typing import IO

from reportlab.lib.pagesizes import A4
from reportlab.pdfgen.canvas import Canvas

from store.models import Purchase
from store.receipts import STORE_NAME, Receipt, iter_receipts, money

_WIDTH, _HEIGHT = A4
_MARGIN = 50
_ROW = 16
_ROWS_PER_PAGE = 40


def month_receipts(month: date) -> Iterable[Receipt]:
    """The purchases of the month starting on `month`, oldest first, with their lines."""
    after = date(month.year + month.month // 12, month.month % 12 + 1, 1)
    purchases = Purchase.objects.filter(
        created_at__date__gte=month, created_at__date__lt=after
    ).order_by("created_at", "id")
    return iter_receipts(purchases)


def write_sales_report(
    month: date, receipts: Iterable[Receipt], out: IO[bytes], *, machine: str
) -> int:
    """Write the report to `out`; the number of pages."""
    rows = list(receipts)
    total = sum((r.total for r in rows), Decimal("0.00"))
    canvas = Canvas(out, pagesize=A4, pageCompression=1)
    canvas.setTitle(f"Sales report {month:%Y-%m}")
    canvas.setAuthor(STORE_NAME)
    pages = 0

    def footer() -> None:
        nonlocal pages
        pages += 1
        canvas.setFont("Helvetica-Oblique", 8)
        canvas.drawString(_MARGIN, 30, f"page {pages} - generated on Machine {machine}")
        canvas.showPage()

    canvas.setFont("Helvetica-Bold", 20)
    canvas.drawString(_MARGIN, _HEIGHT - 80, f"{STORE_NAME}: sales report")
    canvas.setFont("Helvetica", 14)
    canvas.drawString(_MARGIN, _HEIGHT - 110, f"{month:%B %Y}")
    canvas.drawString(_MARGIN, _HEIGHT - 150, f"Purchases: {len(rows)}")
    canvas.drawString(_MARGIN, _HEIGHT - 170, f"Sales: {money(total)}")
    items = sum(line.quantity for r in rows for line in r.lines)
    canvas.drawString(_MARGIN, _HEIGHT - 190, f"Items sold: {items}")
    footer()
    for start in range(0, len(rows), _ROWS_PER_PAGE):
        y = _HEIGHT - 60
        canvas.setFont("Helvetica-Bold", 10)
        for x, title in ((_MARGIN, "Number"), (_MARGIN + 70, "Date"), (_MARGIN + 180, "Customer")):
            canvas.drawString(x, y, title)
        canvas.drawRightString(_WIDTH - _MARGIN, y, "Total")
        canvas.line(_MARGIN, y - 5, _WIDTH - _MARGIN, y - 5)
        canvas.setFont("Helvetica", 10)
        for receipt in rows[start : start + _ROWS_PER_PAGE]:
            y -= _ROW
            canvas.drawString(_MARGIN, y, receipt.number)
            canvas.drawString(_MARGIN + 70, y, f"{receipt.created_at:%Y-%m-%d %H:%M}")
            canvas.drawString(_MARGIN + 180, y, receipt.customer[:40])
            canvas.drawRightString(_WIDTH - _MARGIN, y, money(receipt.total))
        footer()
    canvas.save()
    return pages
