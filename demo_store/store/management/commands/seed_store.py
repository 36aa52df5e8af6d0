"""`manage.py seed_store --purchases N`: deterministic sample products and purchases, idempotent."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from store.models import Product, Purchase, PurchaseItem

# (sku, name, price)
PRODUCTS: tuple[tuple[str, str, str], ...] = (
    ("MUG-001", "Replay mug", "12.50"),
    ("TEE-002", "Serverless T-shirt", "24.00"),
    ("CAP-003", "Cold-start cap", "18.00"),
    ("STK-004", "Sticker pack (10)", "4.99"),
    ("NTB-005", "Machine notebook", "9.75"),
    ("PEN-006", "Fountain pen, violet ink", "31.20"),
    ("HDY-007", "Autostop hoodie", "49.00"),
    ("BAG-008", "Canvas tote bag", "15.40"),
    ("BTL-009", "Insulated bottle 750 ml", "22.90"),
    ("SCK-010", "Socks, three pairs", "13.30"),
    ("PST-011", "Poster: a map of regions", "8.00"),
    ("KEY-012", "Mechanical keyboard, 60 percent layout with hot-swappable switches", "119.00"),
)
FIRST_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Margaret", "Linus", "Radia")
LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Thompson", "Hamilton")
EPOCH = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
BATCH = 1000


@dataclass(frozen=True, slots=True)
class PurchaseSpec:
    customer: str
    created_at: datetime
    items: tuple[tuple[str, int], ...]  # (sku, quantity)


def purchase_spec(index: int) -> PurchaseSpec:
    """The `index`-th sample purchase: a function of the index alone, the same on every run."""
    rng = random.Random(f"flyfn-demo-store-{index}")  # str seeds hash stably across processes
    customer = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    created_at = EPOCH + timedelta(minutes=97 * index + rng.randrange(60))
    skus = rng.sample([sku for sku, _name, _price in PRODUCTS], rng.randint(1, 5))
    return PurchaseSpec(customer, created_at, tuple((sku, rng.randint(1, 4)) for sku in skus))


def ensure_products() -> dict[str, Product]:
    """Create the missing sample products; existing ones (maybe edited since) stay as they are."""
    existing = {p.sku: p for p in Product.objects.filter(sku__in=[sku for sku, *_ in PRODUCTS])}
    missing = [
        Product(sku=sku, name=name, price=Decimal(price))
        for sku, name, price in PRODUCTS
        if sku not in existing
    ]
    Product.objects.bulk_create(missing)
    return existing | {p.sku: p for p in Product.objects.filter(sku__in=[p.sku for p in missing])}


def seed(purchases: int) -> int:
    """Make sure the store has at least `purchases` purchases; return how many were created."""
    with transaction.atomic():
        products = ensure_products()
        start = Purchase.objects.count()
        for batch_start in range(start, purchases, BATCH):
            specs = [
                purchase_spec(i) for i in range(batch_start, min(batch_start + BATCH, purchases))
            ]
            rows = Purchase.objects.bulk_create(
                Purchase(customer=spec.customer, created_at=spec.created_at) for spec in specs
            )
            PurchaseItem.objects.bulk_create(
                PurchaseItem(
                    purchase=row,
                    product=products[sku],
                    quantity=quantity,
                    unit_price=products[sku].price,
                )
                for row, spec in zip(rows, specs, strict=True)
                for sku, quantity in spec.items
            )
    return max(0, purchases - start)


class Command(BaseCommand):
    help = (
        "Create deterministic sample products and purchases until the store has at least "
        "--purchases of them. Running it again changes nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--purchases", type=int, default=25, help="default: 25")
        parser.add_argument(
            "--if-empty",
            action="store_true",
            help="do nothing when the store already has purchases (what `make demo` uses)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        wanted: int = options["purchases"]
        if wanted < 0:
            raise CommandError("--purchases must be 0 or more")
        skip = options["if_empty"] and Purchase.objects.exists()
        created = 0 if skip else seed(wanted)
        total = Purchase.objects.count()
        self.stdout.write(f"seed_store: created {created} purchases; the store has {total}.")
