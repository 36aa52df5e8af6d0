"""Machine time and cost per group as Prometheus gauges, computed when scraped from the Machine
lists the pools hold."""

from __future__ import annotations

import math

from django.test import override_settings
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flyfn.machine_metrics import MachineTimeCollector, pool_lists
from flyfn.machines.models import Machine, MachineEvent, MachineGuest
from flyfn.pool.manager import PoolManager

NOW = 1_800_000_000.0


def function_machine(
    machine_id: str, group: str, region: str, *events: tuple[str, float]
) -> Machine:
    """A function Machine of `group` whose events entered `(status, seconds before NOW)`."""
    return Machine(
        id=machine_id,
        region=region,
        config={"image": "img", "metadata": {"flyfn_group": group}},
        events=[
            MachineEvent(type="start", status=status, timestamp=int((NOW - ago) * 1000))
            for status, ago in events
        ],
    )


def scrape(lists: dict[str, list[Machine]]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(MachineTimeCollector(lambda app: lists.get(app, []), clock=lambda: NOW))
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@override_settings(FLYFN={"APP_NAME": "shop", "API_TOKEN": "tok"})
def test_each_group_s_seconds_starts_and_cost_over_the_last_hour() -> None:
    machines = [
        # Created two hours ago, started for the last 15 minutes of the hour.
        function_machine("a", "pdf", "ams", ("created", 7200), ("started", 900)),
        function_machine("b", "pdf", "fra", ("created", 7200), ("suspended", 1800)),
        function_machine("c", "mail", "ams", ("created", 7200)),
        # An app Machine (no group) is no group's.
        Machine(id="d", region="ams", config={"image": "img"}, events=[]),
    ]
    values = scrape({"shop": machines})
    assert (
        values[
            ("flyfn_machine_seconds", (("group", "pdf"), ("region", "ams"), ("state", "started")))
        ]
        == 900
    )
    assert (
        values[
            ("flyfn_machine_seconds", (("group", "pdf"), ("region", "ams"), ("state", "stopped")))
        ]
        == 2700
    )
    assert (
        values[
            ("flyfn_machine_seconds", (("group", "pdf"), ("region", "fra"), ("state", "suspended")))
        ]
        == 1800
    )
    assert values[("flyfn_machine_starts", (("group", "pdf"), ("region", "ams")))] == 1
    assert values[("flyfn_machine_starts", (("group", "pdf"), ("region", "fra")))] == 0
    # By hand: shared-cpu-1x 256 MB runs at $1.945 per 30 days (2,592,000 s); a stopped or
    # suspended Machine keeps 1 GB of root file system at $0.15 per 30 days.
    actual = values[("flyfn_machine_cost_dollars", (("group", "pdf"), ("kind", "actual")))]
    assert math.isclose(actual, (900 * 1.945 + (2700 + 3600) * 0.15) / 2_592_000)
    assert math.isclose(actual, 0.001039930555, rel_tol=1e-9)
    always_on = values[("flyfn_machine_cost_dollars", (("group", "pdf"), ("kind", "always_on")))]
    assert math.isclose(always_on, 2 * 3600 * 1.945 / 2_592_000)
    assert values[("flyfn_machine_starts", (("group", "mail"), ("region", "ams")))] == 0
    assert not any(labels and ("group", "") in labels for _, labels in values)


@override_settings(FLYFN={"APP_NAME": "shop", "API_TOKEN": "tok"})
def test_a_machine_size_without_a_price_makes_its_group_s_cost_unknown_not_the_scrape_fail() -> (
    None
):
    odd = function_machine("g", "gpu", "ams", ("created", 7200), ("started", 600))
    assert odd.config is not None
    odd.config.guest = MachineGuest(cpu_kind="a100-pcie-40gb", cpus=8, memory_mb=32768)
    machines = [odd, function_machine("c", "mail", "ams", ("created", 7200))]
    values = scrape({"shop": machines})
    for kind in ("actual", "always_on"):
        assert math.isnan(
            values[("flyfn_machine_cost_dollars", (("group", "gpu"), ("kind", kind)))]
        )
    started = ("flyfn_machine_seconds", (("group", "gpu"), ("region", "ams"), ("state", "started")))
    assert values[started] == 600
    mail = values[("flyfn_machine_cost_dollars", (("group", "mail"), ("kind", "actual")))]
    assert math.isclose(mail, 3600 * 0.15 / 2_592_000)


def test_without_settings_or_lists_it_has_no_figures() -> None:
    with override_settings(FLYFN={"GROUPS": {"pdf": {"machines": "many"}}}):
        assert scrape({}) == {}
    with override_settings(FLYFN={"APP_NAME": "shop", "API_TOKEN": "tok"}):
        assert scrape({}) == {}


def test_the_pools_lists_are_read_without_an_api_call(pool_manager: PoolManager) -> None:
    assert pool_lists("shop") == []
    machine = function_machine("a", "pdf", "ams", ("started", 60))
    pool_manager.listing.write("shop", NOW, [machine])
    assert [m.id for m in pool_lists("shop")] == ["a"]
