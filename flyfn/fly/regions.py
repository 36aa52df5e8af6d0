"""Fly's regions and where they are: great-circle distances between them, the one-way network
latency the emulator gives a hop between two regions, and "nearest first" orders of regions.

The codes and cities are Fly's published region list (fly.io/docs/reference/regions); the
coordinates are those of the cities the regions are named after (public city coordinates, rounded
to two decimals), which is all the precision a latency estimate needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

__all__ = [
    "EARTH_RADIUS_KM",
    "FIBER_KM_PER_MS",
    "REGIONS",
    "ROUTE_FACTOR",
    "Region",
    "distance_km",
    "is_fly_region",
    "nearest_first",
    "one_way_latency_ms",
    "parse_region_list",
]

EARTH_RADIUS_KM = 6371.0
# Light in optical fiber covers about 200 km per millisecond (two thirds of c).
FIBER_KM_PER_MS = 200.0
# Cables do not follow great circles: a path between two cities is about 1.5 times their distance,
# which puts iad-syd at ~235 ms round trip, as measured between those cities.
ROUTE_FACTOR = 1.5


class Region(NamedTuple):
    """A Fly region: its city, latitude and longitude (degrees, north and east positive)."""

    city: str
    lat: float
    lon: float


REGIONS: dict[str, Region] = {
    "ams": Region("Amsterdam, Netherlands", 52.37, 4.90),
    "arn": Region("Stockholm, Sweden", 59.33, 18.07),
    "atl": Region("Atlanta, Georgia (US)", 33.75, -84.39),
    "bog": Region("Bogotá, Colombia", 4.71, -74.07),
    "bom": Region("Mumbai, India", 19.08, 72.88),
    "bos": Region("Boston, Massachusetts (US)", 42.36, -71.06),
    "cdg": Region("Paris, France", 48.86, 2.35),
    "den": Region("Denver, Colorado (US)", 39.74, -104.99),
    "dfw": Region("Dallas, Texas (US)", 32.78, -96.80),
    "ewr": Region("Secaucus, NJ (US)", 40.79, -74.06),
    "eze": Region("Ezeiza, Argentina", -34.82, -58.54),
    "fra": Region("Frankfurt, Germany", 50.11, 8.68),
    "gdl": Region("Guadalajara, Mexico", 20.67, -103.35),
    "gig": Region("Rio de Janeiro, Brazil", -22.91, -43.17),
    "gru": Region("São Paulo, Brazil", -23.55, -46.63),
    "hkg": Region("Hong Kong, Hong Kong", 22.32, 114.17),
    "iad": Region("Ashburn, Virginia (US)", 39.04, -77.49),
    "jnb": Region("Johannesburg, South Africa", -26.20, 28.05),
    "lax": Region("Los Angeles, California (US)", 34.05, -118.24),
    "lhr": Region("London, United Kingdom", 51.51, -0.13),
    "mad": Region("Madrid, Spain", 40.42, -3.70),
    "mia": Region("Miami, Florida (US)", 25.76, -80.19),
    "nrt": Region("Tokyo, Japan", 35.68, 139.69),
    "ord": Region("Chicago, Illinois (US)", 41.88, -87.63),
    "otp": Region("Bucharest, Romania", 44.43, 26.10),
    "phx": Region("Phoenix, Arizona (US)", 33.45, -112.07),
    "qro": Region("Querétaro, Mexico", 20.59, -100.39),
    "scl": Region("Santiago, Chile", -33.45, -70.67),
    "sea": Region("Seattle, Washington (US)", 47.61, -122.33),
    "sin": Region("Singapore, Singapore", 1.35, 103.82),
    "sjc": Region("San Jose, California (US)", 37.34, -121.89),
    "syd": Region("Sydney, Australia", -33.87, 151.21),
    "waw": Region("Warsaw, Poland", 52.23, 21.01),
    "yul": Region("Montreal, Canada", 45.50, -73.57),
    "yyz": Region("Toronto, Canada", 43.65, -79.38),
}


def is_fly_region(region: str) -> bool:
    return region in REGIONS


def distance_km(a: str, b: str) -> float | None:
    """The great-circle (haversine) distance between two regions; 0 for the same code, None
    when either is not in the table (a region Fly added since, or the emulator's `local`)."""
    if a == b:
        return 0.0
    here, there = REGIONS.get(a), REGIONS.get(b)
    if here is None or there is None:
        return None
    lat1, lon1, lat2, lon2 = map(math.radians, (here.lat, here.lon, there.lat, there.lon))
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def one_way_latency_ms(a: str, b: str) -> float:
    """The emulated one-way latency between two regions: `ROUTE_FACTOR * distance /
    FIBER_KM_PER_MS` (0 within a region, and between regions the table does not know)."""
    km = distance_km(a, b)
    return 0.0 if km is None else ROUTE_FACTOR * km / FIBER_KM_PER_MS


def nearest_first(origin: str, regions: Iterable[str]) -> list[str]:
    """`regions` without repeats, nearest to `origin` first (the origin itself first of all);
    regions of unknown distance last, in the order given."""
    unique = list(dict.fromkeys(regions))

    def key(item: tuple[int, str]) -> tuple[float, int]:
        index, region = item
        km = distance_km(origin, region)
        return (math.inf if km is None else km, index)

    return [region for _, region in sorted(enumerate(unique), key=key)]


def parse_region_list(text: str) -> tuple[str, ...]:
    """`"iad,syd"` as `("iad", "syd")`; ValueError naming a code that is not a Fly region."""
    codes = tuple(dict.fromkeys(c.strip().lower() for c in text.split(",") if c.strip()))
    if not codes:
        raise ValueError("name at least one Fly region, e.g. iad,syd")
    unknown = [c for c in codes if c not in REGIONS]
    if unknown:
        raise ValueError(
            f"{unknown[0]!r} is not a Fly region; Fly's regions are {', '.join(sorted(REGIONS))}"
        )
    return codes
