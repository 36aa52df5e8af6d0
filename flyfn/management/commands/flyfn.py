"""`manage.py flyfn`: status, prepare and gc of the function Machines (and `dev`, the local Fly;
`tick`, what a scheduled Machine runs for periodic tasks).

Each subcommand is a parser in `add_arguments` and a `handle_<name>` method; API errors and missing
settings end in a CommandError (a clear message, a non-zero exit), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections
from prometheus_client.parser import text_string_to_metric_families

from flyfn.conf import FlyfnSettings, SettingsError, get_settings
from flyfn.cost_report import (
    COST_HEADER,
    DEFAULT_WINDOW,
    UNKNOWN,
    cost_row,
    group_costs,
    money,
    seconds_text,
)
from flyfn.fly.env import FLY_REGION, PRIMARY_REGION, env_value
from flyfn.fly.pricing import PRICES_SOURCE
from flyfn.fly.regions import parse_region_list
from flyfn.fly.schedule import INTERVALS
from flyfn.machine_time import by_region, parse_window
from flyfn.machines import (
    COMMAND_RATE_LIMIT_RETRIES,
    AsyncMachinesClient,
    Machine,
    MachinesError,
)
from flyfn.pool.converge import (
    GONE_STATES,
    PrepareReport,
    app_regions,
    destroy_orphans,
    find_orphans,
    machine_group,
    machine_image,
    machine_schedule,
    prepare_group,
)
from flyfn.pool.placement import Placement, placement, pool_regions
from flyfn.pool.spec import (
    GROUP_METADATA_KEY,
    PoolConfigError,
    group_app,
    is_task_group,
    new_client,
    spec_for,
)
from flyfn.registry import ServerlessView, iter_url_routes, registry

T = TypeVar("T")

# Seconds status, prepare and gc may spend on the Machines API: a release_command must end (the
# client's own timeouts and retries would let an API that never answers hold it for 90 s and more).
DEFAULT_DEADLINE = 60.0
# Seconds `tick` may spend on its look (the database): generous, but a tick that hangs keeps its
# scheduled Machine started, and Fly starts no running Machine, so every later slot would be lost.
TICK_DEADLINE = 180.0
# The wall clock a status window ends at (tests drive the emulator's Machines on their own).
CLOCK: Callable[[], float] = time.time


class Command(BaseCommand):
    help = "flyfn: show, prepare and clean up the Fly Machines that run serverless views."

    def add_arguments(self, parser: CommandParser) -> None:
        commands = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
        status = commands.add_parser(
            "status", help="registered views, each group's Machines, state and image freshness"
        )
        prepare = commands.add_parser(
            "prepare",
            help="create/update every group's Machines for the current image (idempotent; fit "
            "for fly.toml's release_command)",
        )
        gc = commands.add_parser(
            "gc",
            help="destroy function Machines whose image no app Machine runs any more, or in a "
            "region their group no longer lives in",
        )
        for api_command in (status, prepare, gc):
            api_command.add_argument(
                "--timeout",
                type=_seconds,
                default=DEFAULT_DEADLINE,
                help="seconds the whole command may spend on the Machines API before it gives up "
                f"(default {DEFAULT_DEADLINE:g}: a release_command must not hang)",
            )
        status.add_argument(
            "--window",
            type=_window,
            default=DEFAULT_WINDOW,
            help="the span of Machine time and cost: a duration (1h, 30m), days (1d, 7d) or "
            f"'deploy' (since the current image's Machines were created; default {DEFAULT_WINDOW})",
        )
        gc.add_argument(
            "--dry-run", action="store_true", help="list what would be destroyed, destroy nothing"
        )
        tick = commands.add_parser(
            "tick",
            help="enqueue the due periodic tasks of a Fly schedule once per slot, deliver their "
            "wakes and exit (what a scheduled Machine runs)",
        )
        tick.add_argument("interval", choices=list(INTERVALS), help="the Fly schedule")
        tick.add_argument(
            "--timeout",
            type=_seconds,
            default=TICK_DEADLINE,
            help=f"seconds the look may take before the command fails (default {TICK_DEADLINE:g}:"
            " a hung database must not keep the scheduled Machine started, as Fly does not start"
            " a running Machine at its next time)",
        )
        dev = commands.add_parser(
            "dev", help="the local Fly stack: Fly Proxy + Machines API + Machines as processes"
        )
        dev.add_argument("--port", type=int, default=8080, help="proxy port (default 8080)")
        dev.add_argument("--host", default="127.0.0.1", help="proxy address (default 127.0.0.1)")
        dev.add_argument(
            "--time-scale",
            type=_time_scale,
            default=1.0,
            help="divide Fly's periods by this (default 1): autostop's pass, every 300 s on Fly, "
            "runs every 300/N s",
        )
        dev.add_argument("--asgi", default=None, help="module:attr of the ASGI app to run")
        dev.add_argument("--api-port", type=int, default=0, help="Machines API port (default any)")
        dev.add_argument(
            "--live-port", type=int, default=0, help="live page port on 127.0.0.1 (default any)"
        )
        dev.add_argument(
            "--config",
            type=Path,
            default=None,
            help="the fly.toml to deploy (default: fly.toml in the current directory, if any)",
        )
        dev.add_argument(
            "--secrets-file",
            type=Path,
            default=None,
            help="NAME=VALUE lines set as the app's secrets before any Machine starts (as "
            "`fly secrets import` reads them); the only way shell values reach the Machines",
        )
        dev.add_argument(
            "--regions",
            type=_regions,
            default=(),
            help="Fly regions with an app Machine each, e.g. iad,syd (default: fly.toml's "
            "primary_region); the primary region is fly.toml's if listed, else the first",
        )
        dev.add_argument(
            "--full-regions",
            type=_regions,
            default=(),
            help="regions where creating a Machine fails for want of capacity, as Fly answers "
            "(412 insufficient_capacity): to see a multi-region group fail over",
        )
        # More subcommands add a parser here and a handle_<name>.

    def handle(self, *args: Any, **options: Any) -> None:
        handler: Callable[..., None] = getattr(self, f"handle_{options['subcommand']}")
        try:
            handler(**options)
        except (SettingsError, PoolConfigError) as exc:
            raise CommandError(str(exc)) from None
        except MachinesError as exc:  # the message names method and path, never the token
            raise CommandError(f"Machines API error: {exc}") from None
        except httpx.HTTPError as exc:
            raise CommandError(f"Machines API unreachable: {type(exc).__name__}") from None
        except TimeoutError:
            raise CommandError(
                f"gave up after {options['timeout']:g} s: the Machines API at "
                f"{get_settings().api_hostname} did not answer in time. flyfn "
                f"{options['subcommand']} has an overall deadline so that a release_command "
                "cannot hang on it; give it more with --timeout SECONDS."
            ) from None

    # ------------------------------------------------------------------ status

    def handle_status(self, **options: Any) -> None:
        settings = get_settings()
        rows = [
            (route, ",".join(sorted(view.methods)), view.group, view.name)
            for route, view in serverless_routes()
        ]
        self.stdout.write(self.style.MIGRATE_HEADING("Serverless views"))
        if rows:
            self._table(("URL", "METHODS", "GROUP", "VIEW"), rows)
        else:
            self.stdout.write("  (none: mark views with @fly_serverless or FLYFN['VIEWS'])")
        self._tasks_status()
        self._schedules_status()
        self._metrics_status(settings)
        groups = all_groups(settings)
        self.stdout.write(self.style.MIGRATE_HEADING("Groups"))
        if not settings.app_name:
            self.stdout.write(
                "  not on Fly (no FLYFN['APP_NAME'] / FLY_APP_NAME): every view runs locally"
            )
            return
        listed = run(self._group_machines(settings, groups), options["timeout"])
        # Destroyed Machines count for their cost, not among the group's Machines.
        machines = {
            group: [m for m in found if m.state not in GONE_STATES]
            for group, found in listed.items()
        }
        app_images = machines.pop("", [])
        scheduled = machines.pop(SCHEDULED_KEY, [])
        if scheduled:
            self.stdout.write("  scheduled Machines (periodic tasks):")
            self._table(
                ("ID", "NAME", "SCHEDULE", "STATE"),
                [(m.id, m.name or "", machine_schedule(m) or "", m.state or "") for m in scheduled],
                indent=4,
            )
        live = {machine_image(m) for m in app_images}
        for group in groups:
            options_ = settings.group(group)
            app = group_app(settings, group)
            found = machines[group]
            where = placement(settings, group, task_group=is_task_group(group))
            per = "per image" if where.mode == "shared" else "per image and region"
            self.stdout.write(
                f"  {group}: app {app}, strategy {options_.strategy}, "
                f"{options_.machines} {per}, {len(found)} found, regions {_placed(where)}"
            )
            if found:
                states = Counter(m.state or "unknown" for m in found)
                fresh = Counter(
                    freshness(machine_image(m), settings.image_ref, live) for m in found
                )
                self.stdout.write(
                    "    by state: "
                    + ", ".join(f"{state} {n}" for state, n in sorted(states.items()))
                    + "; by image: "
                    + ", ".join(f"{kind} {n}" for kind, n in sorted(fresh.items()))
                )
                self.stdout.write(
                    "    by region: "
                    + ", ".join(f"{r} {len(ms)}" for r, ms in by_region(found).items())
                )
            if found:
                self._table(
                    ("ID", "NAME", "REGION", "STATE", "IMAGE", "FRESHNESS"),
                    [
                        (
                            m.id,
                            m.name or "",
                            _region(m),
                            m.state or "",
                            machine_image(m) or "",
                            freshness(machine_image(m), settings.image_ref, live),
                        )
                        for m in found
                    ],
                    indent=4,
                )

        listed.pop("", None)
        listed.pop(SCHEDULED_KEY, None)  # not a group: no levers apply to it
        self._cost_status(listed, settings.image_ref, options["window"])

    def _cost_status(
        self, machines: dict[str, list[Machine]], image: str | None, window: str
    ) -> None:
        """Each group's Machine time and cost over the window, beside the same always on."""
        self.stdout.write(
            self.style.MIGRATE_HEADING(f"Machine time and cost (window {window}, estimates)")
        )
        costs = group_costs(machines, window, image, CLOCK())
        self._table(COST_HEADER, [cost_row(cost) for cost in costs])
        for cost in costs:
            # The table sums a group's regions; Machines in different regions behave apart
            # (each region's pool starts and stops its own; keep_warm holds in the primary one
            # only), so a group in several gets its time per region too.
            if len(cost.regions) > 1:
                for region, spent in sorted(cost.regions.items()):
                    self.stdout.write(
                        f"  {cost.group} in {region}: started {seconds_text(spent.started)}, "
                        f"stopped {seconds_text(spent.stopped)}, suspended "
                        f"{seconds_text(spent.suspended)}, {spent.starts} starts"
                    )
            if cost.unpriced:
                self.stdout.write(
                    f"  {cost.group}: cost {UNKNOWN}: no price for cpu_kind "
                    + ", ".join(repr(kind) for kind in cost.unpriced)
                )
            if cost.levers:
                self.stdout.write(
                    f"  {cost.group}: "
                    + "; ".join(f"{lever.change} {money(lever.cost)}" for lever in cost.levers)
                )
        self.stdout.write(f"  prices: {PRICES_SOURCE}; ~ = events did not cover the whole window")

    def _metrics_status(self, settings: FlyfnSettings) -> None:
        """This Machine's web process's flyfn metrics per group, when it serves them."""
        if settings.metrics_port is None:
            return
        self.stdout.write(self.style.MIGRATE_HEADING("Metrics (this Machine's web process)"))
        url = metrics_url(settings.metrics_address, settings.metrics_port)
        try:
            text = httpx.get(url, timeout=METRICS_TIMEOUT).text
        except httpx.HTTPError as exc:
            self.stdout.write(f"  not available from {url}: {type(exc).__name__}")
            return
        figures = group_figures(text)
        if not figures:
            self.stdout.write("  no requests recorded yet")
            return
        columns = ("replays", "fallbacks", "bounces", "rejected states", "cold waits")
        self._table(
            ("GROUP", *(c.upper() for c in columns)),
            [
                (group, *(f"{figures[group].get(c, 0):g}" for c in columns))
                for group in sorted(figures)
            ],
        )

    def _tasks_status(self) -> None:
        """Per group: tasks ready, scheduled, running, failed and the oldest waiting (only with
        flyfn.tasks installed)."""
        if not tasks_installed():
            return
        from flyfn.tasks.status import task_status

        self.stdout.write(self.style.MIGRATE_HEADING("Tasks"))
        rows = [
            (
                g.group,
                str(g.ready),
                str(g.scheduled),
                str(g.running),
                str(g.failed),
                "-" if g.oldest_waiting is None else f"{g.oldest_waiting.total_seconds():.0f}s",
            )
            for g in task_status()
        ]
        if rows:
            self._table(
                ("GROUP", "READY", "SCHEDULED", "RUNNING", "FAILED", "OLDEST WAITING"), rows
            )
        else:
            self.stdout.write("  (no flyfn.tasks.FlyMachinesBackend in TASKS)")

    def _schedules_status(self) -> None:
        """Every periodic task with its last and next slot (only with flyfn.tasks installed and
        a schedule declared)."""
        if not tasks_installed():
            return
        from flyfn.tasks.periodic import schedule_rows

        rows = schedule_rows()
        if not rows:
            return
        self.stdout.write(self.style.MIGRATE_HEADING("Schedules"))
        self._table(
            ("SCHEDULE", "TASK", "WHEN", "RUNS ON", "LAST SLOT", "NEXT SLOT"),
            [
                (
                    r.name,
                    r.task,
                    r.when,
                    r.runs_on,
                    "-" if r.last_slot is None else f"{r.last_slot:%Y-%m-%d %H:%M:%S}",
                    f"{r.next_slot:%Y-%m-%d %H:%M:%S}",
                )
                for r in rows
            ],
        )

    async def _group_machines(
        self, settings: FlyfnSettings, groups: Sequence[str]
    ) -> dict[str, list[Machine]]:
        """Each group's Machines, plus the app Machines under the key ""."""
        async with _client(settings) as client:
            result: dict[str, list[Machine]] = {}
            own = await client.list_machines()
            result[""] = [
                m for m in own if machine_group(m) is None and machine_schedule(m) is None
            ]
            result[SCHEDULED_KEY] = [m for m in own if machine_schedule(m)]
            for group in groups:
                app = group_app(settings, group)
                result[group] = await client.list_machines(
                    metadata={GROUP_METADATA_KEY: group}, app=app, include_deleted=True
                )
            return result

    # ------------------------------------------------------------------ prepare

    def handle_prepare(self, **options: Any) -> None:
        settings = get_settings()
        groups = all_groups(settings)
        intervals = _schedule_intervals()
        if not groups and not intervals:
            self.stdout.write("No serverless views and no groups declared: nothing to prepare.")
            return

        for group in groups:  # the settings' problems before any API call
            spec_for(settings, group)
        caller = env_value(os.environ, FLY_REGION)
        primary = env_value(os.environ, PRIMARY_REGION)
        placements = {g: placement(settings, g, task_group=is_task_group(g)) for g in groups}

        async def prepare_all() -> list[PrepareReport]:
            async with _client(settings) as client:
                # A group that follows its callers has a pool where the app Machines run (off
                # Fly, where no region is known, its one shared pool as before regions).
                where_app_runs: set[str] = set()
                if caller and any(p.mode == "caller" for p in placements.values()):
                    where_app_runs = app_regions(await client.list_machines())
                specs = [
                    spec_for(settings, group, pool_region=region)
                    for group, where in placements.items()
                    for region in pool_regions(where, caller, primary, where_app_runs)
                ]
                return [await prepare_group(client, spec) for spec in specs]

        for report in run(prepare_all(), options["timeout"]):
            where = f" in {report.region}" if report.region else ""
            self.stdout.write(
                self.style.SUCCESS(f"{report.group}: ")
                + f"{len(report.machines)} Machine(s) in app {report.app}{where} on the current "
                "image "
                f"({_summary(report)})"
            )
        if intervals:
            self._prepare_scheduled(settings, intervals, options["timeout"])

    def _prepare_scheduled(
        self, settings: FlyfnSettings, intervals: list[str], deadline: float
    ) -> None:
        from flyfn.tasks.scheduled_machines import prepare_scheduled

        async def prepare() -> Any:
            async with _client(settings) as client:
                return await prepare_scheduled(client, settings, intervals)

        report = run(prepare(), deadline)
        for interval, machine_id in report.machines.items():
            done = (
                "created" if machine_id in report.created
                else "updated" if machine_id in report.updated
                else "up to date"
            )  # fmt: skip
            self.stdout.write(
                self.style.SUCCESS(f"schedule {interval}: ")
                + f"scheduled Machine {machine_id} ({done})"
            )
        for machine_id in report.destroyed:
            self.stdout.write(f"destroyed duplicate scheduled Machine {machine_id}")

    # ------------------------------------------------------------------ tick

    def handle_tick(self, *, interval: str, timeout: float = TICK_DEADLINE, **options: Any) -> None:
        if not tasks_installed():
            raise CommandError("periodic tasks need 'flyfn.tasks' in INSTALLED_APPS")
        from flyfn.tasks.periodic import enqueue_due, error_text

        try:
            runs = within(
                timeout,
                lambda: enqueue_due(lambda schedule: schedule.fly_interval == interval),
                f"tick {interval} did not finish within {timeout:g} s (the database does not "
                "answer?): the slots it did not enqueue have no run, the next look catches up on "
                "the one before its own",
            )
        except CommandError:
            raise
        except Exception as exc:  # the database is away: say so without its address
            raise CommandError(f"tick {interval} failed: {error_text(exc)}") from None
        for each in runs:
            what = (
                f"cannot be enqueued: {each.error}" if each.error
                else f"enqueued task {each.task_id}" if each.task_id
                else "already run, nothing to do"
            )  # fmt: skip
            late = " (late)" if each.late else ""
            self.stdout.write(f"{each.schedule}: slot {each.slot:%Y-%m-%d %H:%M:%S}{late}: {what}")
        if not runs:
            self.stdout.write(f"no schedule runs {interval}")
        failed = sorted({each.schedule for each in runs if each.error})
        if failed:  # a non-zero exit: Fly runs the scheduled Machine again (restart on-failure)
            raise CommandError(f"schedule(s) not enqueued: {', '.join(failed)}")

    # ------------------------------------------------------------------ dev

    def handle_dev(
        self,
        *,
        port: int,
        host: str,
        time_scale: float = 1.0,
        asgi: str | None,
        api_port: int,
        live_port: int = 0,
        config: Path | None = None,
        secrets_file: Path | None = None,
        regions: tuple[str, ...] = (),
        full_regions: tuple[str, ...] = (),
        **options: Any,
    ) -> None:
        from flyfn.emulator.dev import DevOptions, run_dev  # uvicorn: the [emulator] extra

        dev_options = DevOptions(
            port=port,
            host=host,
            time_scale=time_scale,
            asgi_app=asgi,
            api_port=api_port,
            live_port=live_port,
            config=config,
            secrets_file=secrets_file,
            regions=regions,
            full_regions=full_regions,
        )
        status = run_dev(dev_options)
        if status:
            raise CommandError("flyfn dev stopped with an error (see above)")

    # ------------------------------------------------------------------ gc

    def handle_gc(self, *, dry_run: bool = False, **options: Any) -> None:
        settings = get_settings()

        async def collect() -> list[str]:
            async with _client(settings) as client:
                orphans = await find_orphans(client, settings)
                for orphan in orphans:
                    verb = "would destroy" if dry_run else "destroying"
                    why = (
                        ": its group no longer lives in that region"
                        if orphan.why == "region"
                        else ""
                    )
                    self.stdout.write(
                        f"{verb} {orphan.machine.id} ({orphan.machine.name or '-'}, "
                        f"region {_region(orphan.machine)}, group "
                        f"{machine_group(orphan.machine)}, app {orphan.app}, image "
                        f"{machine_image(orphan.machine)}){why}"
                    )
                unneeded = await _unneeded_scheduled(client)
                for machine in unneeded:
                    self.stdout.write(
                        f"{'would destroy' if dry_run else 'destroying'} scheduled Machine "
                        f"{machine.id} ({machine.name or '-'}): no schedule runs "
                        f"{machine.config.schedule if machine.config else '?'} any more"
                    )
                if dry_run:
                    return [o.machine.id for o in orphans] + [m.id for m in unneeded]
                destroyed = await destroy_orphans(client, orphans)
                for machine in unneeded:
                    await client.destroy_machine(machine.id, force=True)
                    destroyed.append(machine.id)
                return destroyed

        ids = run(collect(), options["timeout"])
        if not ids:
            self.stdout.write("No orphaned function Machines.")
        elif dry_run:
            self.stdout.write(f"{len(ids)} Machine(s) would be destroyed (dry run).")
        else:
            self.stdout.write(self.style.SUCCESS(f"Destroyed {len(ids)} Machine(s)."))

    # ------------------------------------------------------------------ output

    def _table(
        self, header: Sequence[str], rows: Sequence[Sequence[str]], *, indent: int = 2
    ) -> None:
        widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=False)]
        for row in (header, *rows):
            cells = [str(c).ljust(w) for c, w in zip(row, widths, strict=True)]
            self.stdout.write(" " * indent + "  ".join(cells).rstrip())


def _positive(what: str) -> Callable[[str], float]:
    """An argparse type: a positive, finite number (`what` names it in the error)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = 0.0
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text!r}")
        return value

    return parse


_seconds = _positive("number of seconds")


def _window(text: str) -> str:
    """An argparse type: a window `parse_window` reads."""
    try:
        parse_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


_time_scale = _positive("number")


def _client(settings: FlyfnSettings) -> AsyncMachinesClient:
    """The commands' Machines client: someone waits for a command, so it outlasts a burst of
    429s shared with the running Machines (`COMMAND_RATE_LIMIT_RETRIES`)."""
    return new_client(settings, rate_limit_retries=COMMAND_RATE_LIMIT_RETRIES)


def _region(machine: Machine) -> str:
    return machine.region or "-"


def _placed(where: Placement) -> str:
    """How `status` says where a group's Machines live."""
    if where.mode == "listed":
        return ",".join(where.listed)
    return where.mode


def _regions(text: str) -> tuple[str, ...]:
    try:
        return parse_region_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(work: Coroutine[Any, Any, T], deadline: float = DEFAULT_DEADLINE) -> T:
    """Run API work to completion within `deadline` seconds, else TimeoutError (management
    commands run outside any event loop)."""
    return asyncio.run(asyncio.wait_for(work, deadline))


def serverless_routes(urlconf: str | None = None) -> Iterator[tuple[str, ServerlessView]]:
    """Every url pattern whose view is serverless, with its full route."""

    for url in iter_url_routes(urlconf):
        # The instance namespaces' name, as the request's resolver_match gives it.
        view = registry.lookup(url.callback, url.names[0] if url.names else None)
        if view is not None:
            yield "/" + url.route.lstrip("^").rstrip("$"), view


def all_groups(settings: FlyfnSettings) -> list[str]:
    """The groups of registered views and the groups declared in settings."""
    # Walking the urlconf imports the views, which registers the decorated ones.
    routed = {view.group for _, view in serverless_routes()}
    declared = {view.group for view in settings.views.values()}
    return sorted(routed | registry.groups() | declared | set(settings.groups))


# Where `_group_machines` puts the scheduled Machines: no group has this name (no colon allowed).
SCHEDULED_KEY = "flyfn:scheduled"
# The metrics port answers from the same Machine: a short wait is plenty.
METRICS_TIMEOUT = 2.0
_GROUP_FIGURES = {
    "flyfn_replays": "replays",
    "flyfn_fallbacks": "fallbacks",
    "flyfn_bounces": "bounces",
    "flyfn_rejected_states": "rejected states",
    "flyfn_cold_wait_seconds": "cold waits",
}


def metrics_url(address: str, port: int) -> str:
    """Where this Machine's metrics page answers: loopback when they are served on every address
    (`::`, `0.0.0.0`), else the one address they are bound to (`FLYFN["METRICS_ADDRESS"]`)."""
    host = address.strip().strip("[]")
    if host in {"", "::", "0.0.0.0"}:
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


def group_figures(text: str) -> dict[str, dict[str, float]]:
    """Per group, the totals of flyfn's counters (and the count of cold waits) in a Prometheus
    text page."""
    figures: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        column = _GROUP_FIGURES.get(family.name)
        if column is None:
            continue
        for sample in family.samples:
            if not (sample.name.endswith("_total") or sample.name.endswith("_count")):
                continue
            group = sample.labels.get("group", "")
            row = figures.setdefault(group, {})
            row[column] = row.get(column, 0.0) + sample.value
    return figures


def tasks_installed() -> bool:
    """Whether `flyfn.tasks` (tasks, periodic tasks) is in INSTALLED_APPS."""
    from django.apps import apps

    return apps.is_installed("flyfn.tasks")


def _schedule_intervals() -> list[str]:
    """Fly's intervals the periodic tasks use (none without flyfn.tasks)."""
    if not tasks_installed():
        return []
    from flyfn.tasks.scheduled_machines import intervals_in_use

    return intervals_in_use()


async def _unneeded_scheduled(client: Any) -> list[Machine]:
    """Scheduled Machines no periodic task needs: found by their metadata, so that those of a
    project that dropped flyfn.tasks go too (left, each would fail its tick every interval)."""
    from flyfn.tasks.scheduled_machines import find_unneeded

    return await find_unneeded(client, _schedule_intervals())


def within(deadline: float, work: Callable[[], T], message: str) -> T:
    """`work()`'s result, run on a thread of its own, or CommandError(`message`) once `deadline`
    seconds have passed (a hung connect cannot be interrupted; the thread is a daemon, and the
    process exits without it)."""
    done: list[T] = []
    failed: list[BaseException] = []

    def target() -> None:
        try:
            done.append(work())
        except BaseException as exc:
            failed.append(exc)
        finally:
            connections.close_all()  # the thread's own connections

    thread = threading.Thread(target=target, name="flyfn-tick", daemon=True)
    thread.start()
    thread.join(deadline)
    if thread.is_alive():
        raise CommandError(message)
    if failed:
        raise failed[0]
    return done[0]


def freshness(image: str | None, own: str | None, live: set[str | None]) -> str:
    """current: this image; in use: an app Machine runs it; stale: gc will destroy it."""
    if image is not None and image == own:
        return "current"
    return "in use" if image in live else "stale"


def _summary(report: PrepareReport) -> str:
    parts = [
        f"{len(report.created)} created",
        f"{len(report.updated)} updated",
        f"{len(report.destroyed)} destroyed",
    ]
    return ", ".join(parts)
