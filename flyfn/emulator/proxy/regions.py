"""The local Fly Proxy's regions: which edge region a request enters at (a client says where it is
"from" with the `flyfn-from-region` header; Fly picks the edge nearest the client) and the
network latency a hop from that edge to a Machine in another region adds, from their distance
(`flyfn.fly.regions`)."""

from __future__ import annotations

from dataclasses import dataclass

from flyfn.emulator.proxy.errors import ProxyError
from flyfn.fly.regions import one_way_latency_ms

__all__ = ["FROM_REGION_HEADER", "EdgeRegions"]

# Emulator only: the region a request comes "from" (Fly knows it from the client's address).
FROM_REGION_HEADER = "flyfn-from-region"


@dataclass(frozen=True)
class EdgeRegions:
    """The stack's regions (the primary first) and whether hops between them are delayed."""

    regions: tuple[str, ...]
    emulate_latency: bool = True

    @property
    def primary(self) -> str:
        return self.regions[0]

    def edge_of(self, from_region: str | None) -> str:
        """The edge region of a request from `from_region` (None: the primary region's edge);
        a region the stack does not run is a 400 naming the ones it does."""
        if from_region is None:
            return self.primary
        region = from_region.strip().lower()
        if region not in self.regions:
            raise ProxyError(
                "PR00",
                400,
                f"{FROM_REGION_HEADER}: {from_region!r} is not a region of this stack "
                f"({', '.join(self.regions)}; `flyfn dev --regions` sets them)",
            )
        return region

    def hop_seconds(self, edge: str, machine_region: str | None) -> float:
        """The round trip a delivery from `edge` to a Machine in `machine_region` adds:
        twice the one-way latency between them (0 within a region)."""
        if not self.emulate_latency or machine_region is None:
            return 0.0
        return 2 * one_way_latency_ms(edge, machine_region) / 1000
