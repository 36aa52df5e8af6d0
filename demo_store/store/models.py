"""The store's data: products, purchases and the items of each purchase."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, ClassVar

from django.db import models
from django.urls import reverse
from django.utils import timezone

if TYPE_CHECKING:
    from django.db.models.fields.related_descriptors import RelatedManager

# The managers are declared explicitly so type checkers know them without the app being installed
# in the settings they use (the project's mypy runs with the flyfn test settings).


class Product(models.Model):
    name = models.CharField(max_length=120)
    sku = models.CharField("SKU", max_length=32, unique=True)
    price = models.DecimalField(max_digits=10, decimal_places=2)

    objects: ClassVar[models.Manager[Product]] = models.Manager()

    class Meta:
        ordering = ("name",)

    def __str__(self) -> str:
        return f"{self.name} ({self.sku})"


class Purchase(models.Model):
    customer = models.CharField(max_length=120)
    # A default rather than auto_now_add, so seed data can set its own dates.
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    objects: ClassVar[models.Manager[Purchase]] = models.Manager()
    if TYPE_CHECKING:
        items: RelatedManager[PurchaseItem]

    class Meta:
        ordering = ("-created_at", "-id")

    def __str__(self) -> str:
        return f"Purchase {self.number}"

    def get_absolute_url(self) -> str:
        return reverse("store:purchase_detail", args=[self.pk])

    @property
    def number(self) -> str:
        return purchase_number(self.pk)


class PurchaseItem(models.Model):
    purchase = models.ForeignKey(Purchase, on_delete=models.CASCADE, related_name="items")
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="purchase_items")
    quantity = models.PositiveIntegerField(default=1)
    # Captured when the purchase is made: later price changes must not rewrite old receipts.
    unit_price = models.DecimalField(max_digits=10, decimal_places=2)

    objects: ClassVar[models.Manager[PurchaseItem]] = models.Manager()
    if TYPE_CHECKING:
        product_id: int

    class Meta:
        ordering = ("id",)

    def __str__(self) -> str:
        return f"{self.quantity} x {self.product_id}"

    @property
    def line_total(self) -> Decimal:
        return self.unit_price * self.quantity


def purchase_number(pk: int) -> str:
    """The number printed on pages and receipts for the purchase with primary key `pk`."""
    return f"{pk:06d}"


class SalesReport(models.Model):
    """A month's sales report: requested on the store page, drawn by a background task on a
    function Machine, its PDF kept here (so any Machine can serve it)."""

    month = models.DateField(help_text="The first day of the month the report covers.")
    requested_at = models.DateTimeField(default=timezone.now)
    task_id = models.CharField(max_length=64, blank=True)
    pdf = models.BinaryField(null=True, blank=True)
    pages = models.PositiveIntegerField(default=0)
    machine = models.CharField(max_length=64, blank=True)

    objects: ClassVar[models.Manager[SalesReport]] = models.Manager()

    class Meta:
        ordering = ("-requested_at", "-id")

    def __str__(self) -> str:
        return f"Sales report {self.month:%Y-%m}"
