"""Fly's published prices for Machines: what a second of a running Machine of a given size costs,
and what a stopped or suspended one costs for its root file system.

Source and date, honestly: Fly's pricing page (fly.io/docs/about/pricing, "Machines", the
per-30-days prices of its presets in its cheapest regions, e.g. iad, ams) as it read in 2024-2025,
written down from that page; the sandbox this table was written in could not reach fly.io to read
it again on `PRICES_AS_OF`. Checked on 2026-12-07 against Fly's own price list in its blog post
"New VMs: more RAM, extra CPU, and a dollar menu" (fly.io/blog, read from a stored copy):
shared-cpu-1x with 256 MB $1.94, 1 GB $5.70, 2 GB $10.70; 1 dedicated (now "performance") CPU
with 2 GB $31.00, 4 GB $41.01; the table gives each within a cent (a test holds it). That post
priced memory beyond 2 GB per CPU higher on 2 to 8 dedicated CPUs than the $5 per GB used here.
Third-party pages dated 2025-2026 agree on the smallest preset ($1.94 per 30 days; one quotes
$2.02, a dearer region). The root file system price ($0.15 per GB
per 30 days of a stopped Machine) is from Fly's announcement of that charge (April 2024). Fly
prices some regions higher; a figure from this table is an estimate, never an invoice.

Fly prices a preset per CPU (its smallest memory included) plus a fixed price per GB of memory
beyond that: `monthly(guest) = cpus x PER_CPU[kind] + extra GB x PER_EXTRA_GB`, which gives every
preset on the page (shared-cpu-2x with 1 GB: 2 x 1.945 + 0.5 x 5 = $6.39). Months are 30 days.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_ROOTFS_GB",
    "INCLUDED_MB_PER_CPU",
    "PER_CPU_MONTHLY",
    "PER_EXTRA_GB_MONTHLY",
    "PRICES_AS_OF",
    "PRICES_SOURCE",
    "ROOTFS_GB_MONTHLY",
    "SECONDS_PER_MONTH",
    "Guest",
    "has_price",
    "preset_name",
    "running_per_second",
    "storage_per_second",
]

PRICES_AS_OF = "2025-06"
PRICES_SOURCE = (
    "fly.io/docs/about/pricing (Machines presets, cheapest regions) as of 2025-06, "
    "written down, not re-read; rootfs: Fly's announcement of April 2024"
)
SECONDS_PER_MONTH = 30 * 24 * 3600
"""Fly's prices are per 30 days, billed per second."""

PER_CPU_MONTHLY: dict[str, float] = {"shared": 1.945, "performance": 31.00}
"""Dollars per 30 days for one CPU with its included memory (shared-cpu-1x 256 MB: $1.94;
performance-1x 2 GB: $31.00)."""
INCLUDED_MB_PER_CPU: dict[str, int] = {"shared": 256, "performance": 2048}
"""The memory each CPU's price includes (Fly's smallest memory per CPU of that kind)."""
PER_EXTRA_GB_MONTHLY = 5.00
"""Dollars per 30 days for each GB of memory beyond the included (shared-cpu-1x 1 GB: $5.70)."""
ROOTFS_GB_MONTHLY = 0.15
"""Dollars per 30 days for each GB of root file system a stopped (or suspended) Machine keeps."""
DEFAULT_ROOTFS_GB = 1.0
"""The root file system a Machine is priced with when stopped: the API does not say how much of
its 8 GB an image uses (a Django image is typically a few hundred MB to 1 GB)."""


@dataclass(frozen=True, slots=True)
class Guest:
    """A Machine's size as the API's `guest` gives it (Fly's defaults for what is missing)."""

    cpu_kind: str = "shared"
    cpus: int = 1
    memory_mb: int = 256


def has_price(guest: Guest) -> bool:
    """Whether the table prices this size (its `cpu_kind` is one it knows)."""
    return guest.cpu_kind in PER_CPU_MONTHLY


def running_per_second(guest: Guest) -> float:
    """Dollars per second of a started Machine of this size; ValueError for an unknown kind."""
    try:
        per_cpu = PER_CPU_MONTHLY[guest.cpu_kind]
    except KeyError:
        raise ValueError(
            f"no price for cpu_kind {guest.cpu_kind!r}: the table knows "
            + ", ".join(sorted(PER_CPU_MONTHLY))
        ) from None
    included = INCLUDED_MB_PER_CPU[guest.cpu_kind] * guest.cpus
    extra_gb = max(0, guest.memory_mb - included) / 1024
    return (guest.cpus * per_cpu + extra_gb * PER_EXTRA_GB_MONTHLY) / SECONDS_PER_MONTH


def storage_per_second(rootfs_gb: float = DEFAULT_ROOTFS_GB) -> float:
    """Dollars per second of a stopped or suspended Machine keeping `rootfs_gb` GB."""
    return rootfs_gb * ROOTFS_GB_MONTHLY / SECONDS_PER_MONTH


def preset_name(guest: Guest) -> str:
    """Fly's name for the size: `shared-cpu-1x 256MB`, `performance-2x 4096MB`."""
    return f"{guest.cpu_kind}-cpu-{guest.cpus}x {guest.memory_mb}MB".replace(
        "performance-cpu", "performance"
    )
