"""URLs of the store app (mounted at /purchases/)."""

from __future__ import annotations

from django.urls import path

from store import views

app_name = "store"

urlpatterns = [
    path("", views.purchase_list, name="purchase_list"),
    path("receipts.pdf", views.all_receipts, name="all_receipts"),
    path("reports/", views.request_sales_report, name="request_sales_report"),
    path("reports/<int:pk>.pdf", views.sales_report_pdf, name="sales_report_pdf"),
    path("<int:pk>/", views.purchase_detail, name="purchase_detail"),
    path("<int:pk>/receipt.pdf", views.purchase_receipt, name="purchase_receipt"),
]
