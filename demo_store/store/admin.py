"""Admin for products, purchases (with their items inline) and purchase items."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib import admin

from store.models import Product, Purchase, PurchaseItem

# ModelAdmin is generic only for type checkers (django-stubs); at run time it is not subscriptable.
if TYPE_CHECKING:
    ProductAdminBase = admin.ModelAdmin[Product]
    PurchaseAdminBase = admin.ModelAdmin[Purchase]
    PurchaseItemAdminBase = admin.ModelAdmin[PurchaseItem]
    PurchaseItemInlineBase = admin.TabularInline[PurchaseItem, Purchase]
else:
    ProductAdminBase = PurchaseAdminBase = PurchaseItemAdminBase = admin.ModelAdmin
    PurchaseItemInlineBase = admin.TabularInline


@admin.register(Product)
class ProductAdmin(ProductAdminBase):
    list_display = ("name", "sku", "price")
    search_fields = ("name", "sku")


class PurchaseItemInline(PurchaseItemInlineBase):
    model = PurchaseItem
    extra = 1
    autocomplete_fields = ("product",)


@admin.register(Purchase)
class PurchaseAdmin(PurchaseAdminBase):
    list_display = ("id", "customer", "created_at")
    search_fields = ("customer",)
    date_hierarchy = "created_at"
    inlines = (PurchaseItemInline,)


@admin.register(PurchaseItem)
class PurchaseItemAdmin(PurchaseItemAdminBase):
    list_display = ("purchase", "product", "quantity", "unit_price")
    list_select_related = ("purchase", "product")
    autocomplete_fields = ("product",)
    raw_id_fields = ("purchase",)
