"""Machine time and cost per group as Prometheus gauges, computed when scraped from the Machine
lists the pools hold."""

from __future__ import annotations

import math

from django.test import override_settings
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flyfn.fly.pricing import Guest, running_per_second, storage_per_second
from flyfn.machine_metrics import WINDOW_SECONDS, MachineTimeCollector, pool_lists
from flyfn.machines.models import Machine, MachineEvent
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
    assert values[("flyfn_machine_starts", (("group", "pdf"),))] == 1
    running, storage = running_per_second(Guest()), storage_per_second()
    actual = values[("flyfn_machine_cost_dollars", (("group", "pdf"), ("kind", "actual")))]
    assert math.isclose(actual, 900 * running + (2700 + 3600) * storage)
    always_on = values[("flyfn_machine_cost_dollars", (("group", "pdf"), ("kind", "always_on")))]
    assert math.isclose(always_on, 2 * WINDOW_SECONDS * running)
    assert values[("flyfn_machine_starts", (("group", "mail"),))] == 0
    assert not any(labels and ("group", "") in labels for _, labels in values)


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
