"""`flyfn dev`'s live page: the emulated Machines, their starts and stops, each group's pools
(Machines and started ones per region), each group's Machine time and cost since the stack started
(per region too when the stack has Machines in several), recent routes and tasks.

A plain ASGI app served on a loopback port of its own (never in the app's URL space): `/` is one
HTML page whose script polls `/state.json` twice a second and redraws, so it updates without
reloading. It shows no environment, secret or token: Machine ids, names, groups, states, images,
regions, event times, the proxy's route lines and task counts.

It answers only requests whose `Host` is a loopback name with its port (`127.0.0.1`, `localhost`,
`[::1]`), and 400 to any other: a web page on another name that resolves to 127.0.0.1 (DNS
rebinding) could otherwise read the route lines, query strings included.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flyfn.cost_report import COST_HEADER, REGION_COST_HEADER, cost_row, region_cost_rows
from flyfn.emulator.asgi import Receive, Scope, Send
from flyfn.emulator.logline import RequestLog
from flyfn.emulator.state import MachinesEmulator
from flyfn.machine_time import Window, by_region, group_cost
from flyfn.machines.models import Machine
from flyfn.pool.spec import GROUP_METADATA_KEY, SCHEDULE_METADATA_KEY

__all__ = ["MAX_ROUTES", "LivePage"]

MAX_ROUTES = 200  # route lines kept for the page (the terminal has them all)
_EVENTS_PER_MACHINE = 20
_TEXT = "text/plain; charset=utf-8"
# The names a browser on this computer reaches the page by (it listens on 127.0.0.1 only).
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")

TaskCounts = Callable[[], Mapping[str, Mapping[str, Any]]]


class LivePage:
    """The live page's state and its ASGI app.

    `apps` names the apps whose Machines are shown (the project's app and any function app);
    `tasks`, when given, returns per-group task figures (ready, running, failed, ...). `port` is
    the port it listens on, which a request's `Host` must name (default: the port the server
    reports for the request).
    """

    def __init__(
        self,
        emulator: MachinesEmulator,
        apps: Callable[[], Iterable[str]],
        *,
        tasks: TaskCounts | None = None,
        clock: Callable[[], float] = time.time,
        port: int | None = None,
    ) -> None:
        self.emulator = emulator
        self.port = port
        self.apps = apps
        self.tasks = tasks
        self._clock = clock
        self._routes: deque[dict[str, Any]] = deque(maxlen=MAX_ROUTES)
        self._started = emulator.clock()

    def record_route(self, entry: RequestLog) -> None:
        """Keep one proxy route line (the same text as the terminal's) for the page."""
        self._routes.appendleft(
            {
                "at": self._clock(),
                "line": str(entry),
                "machine": entry.machine_id,
                "status": entry.status,
                "region": entry.region,  # where it entered, in a stack of several regions
            }
        )

    def task_figures(self) -> dict[str, Any]:
        """The tasks provider's figures (blocking: it may query a database), or its error."""
        if self.tasks is None:
            return {}
        try:
            return {group: dict(figures) for group, figures in self.tasks().items()}
        except Exception as exc:  # the page must keep drawing the Machines
            return {"error": {"message": f"{type(exc).__name__}: {exc}"}}

    def snapshot(self, tasks: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What the page shows, as JSON-ready data (`tasks`: figures read beforehand)."""
        machines = []
        for app in sorted(set(self.apps())):
            for machine in self.emulator.list(app):
                machines.append(self._machine(app, machine))
        return {
            "now": self._clock(),
            "machines": machines,
            "pools": self.pools(),
            "costs": self.costs(),
            "routes": list(self._routes),
            "tasks": dict(tasks) if tasks is not None else self.task_figures(),
        }

    def pools(self) -> list[dict[str, Any]]:
        """Each group's Machines per region (`by_region`), and how many of them are started."""
        return [
            {
                "group": group,
                "region": region,
                "machines": len(found),
                "started": sum(1 for m in found if m.state == "started"),
            }
            for group, machines in sorted(self._groups(include_deleted=False).items())
            for region, found in by_region(machines).items()
        ]

    def costs(self) -> dict[str, Any]:
        """Each group's Machine time and cost since the stack started (`cost_row` cells); per
        group and region (`region_cost_rows`) when the stack has Machines in more than one
        region, as pools in different regions start and stop apart."""
        groups = self._groups(include_deleted=True)
        window = Window(self._started, self.emulator.clock(), "since flyfn dev started")
        # The stack's regions, the app's Machines included: the table keeps its columns while a
        # group has Machines in one region so far.
        listed = (
            machine
            for app in sorted(set(self.apps()))
            for machine in self.emulator.list(app, include_deleted=True)
        )
        header: tuple[str, ...]
        if len(by_region(listed)) > 1:
            header = REGION_COST_HEADER
            rows = [
                list(row)
                for group, found in sorted(groups.items())
                for row in region_cost_rows(group, found, window)
            ]
        else:
            header = COST_HEADER
            rows = [
                list(cost_row(group_cost(group, found, window)))
                for group, found in sorted(groups.items())
            ]
        return {"header": list(header), "rows": rows, "window": window.label}

    def _groups(self, *, include_deleted: bool) -> dict[str, list[Machine]]:
        """The function Machines of the shown apps by group (destroyed ones too if asked)."""
        groups: dict[str, list[Machine]] = {}
        for app in sorted(set(self.apps())):
            for machine in self.emulator.list(app, include_deleted=include_deleted):
                group = ((machine.config.metadata if machine.config else None) or {}).get(
                    GROUP_METADATA_KEY
                )
                if group is not None:
                    groups.setdefault(group, []).append(machine)
        return groups

    def _machine(self, app: str, machine: Machine) -> dict[str, Any]:
        config = machine.config
        metadata = (config.metadata if config is not None else None) or {}
        events = self.emulator.events(app, machine.id)[:_EVENTS_PER_MACHINE]
        return {
            "app": app,
            "id": machine.id,
            "name": machine.name,
            "group": metadata.get(GROUP_METADATA_KEY)
            or (
                f"schedule {metadata[SCHEDULE_METADATA_KEY]}"
                if SCHEDULE_METADATA_KEY in metadata
                else None
            ),
            "state": machine.state,
            "image": config.image if config is not None else None,
            "region": machine.region,
            "events": [
                {"at": (event.timestamp or 0) / 1000, "type": event.type, "status": event.status}
                for event in events
            ],
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope.get("path", "/"), scope.get("method", "GET")
        if not self._host_allowed(scope):
            await _answer(send, 400, b"bad host: open the page at 127.0.0.1\n", _TEXT)
        elif method not in ("GET", "HEAD"):
            await _answer(send, 405, b"GET only\n", _TEXT)
        elif path == "/":
            await _answer(send, 200, _PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/state.json":
            # A database read must not block the event loop the proxy and the API share.
            tasks = await asyncio.to_thread(self.task_figures)
            body = json.dumps(self.snapshot(tasks), separators=(",", ":")).encode()
            await _answer(send, 200, body, "application/json")
        else:
            await _answer(send, 404, b"not found\n", _TEXT)

    def _host_allowed(self, scope: Scope) -> bool:
        """Whether the request's one `Host` header is a loopback name with the page's port."""
        port = self.port
        if port is None:
            server = scope.get("server") or (None, None)
            port = server[1]
        hosts = [value for name, value in scope.get("headers", []) if name.lower() == b"host"]
        if port is None or len(hosts) != 1:
            return False
        return hosts[0].lower() in {f"{name}:{port}".encode() for name in _LOOPBACK_NAMES}


async def _answer(send: Send, status: int, body: bytes, content_type: str) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>flyfn dev: live</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  :root { --fg: #1d2330; --muted: #6b7280; --line: #e5e7eb; --ok: #15803d; --warn: #b45309;
          --off: #9ca3af; --bg: #f9fafb; }
  body { font: 14px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg);
         margin: 0; padding: 1.2rem 1.6rem; }
  h1 { font-size: 1.2rem; margin: 0 0 .2rem; } h2 { font-size: 1rem; margin: 1.4rem 0 .5rem; }
  .muted { color: var(--muted); }
  table { border-collapse: collapse; width: 100%; background: #fff; }
  th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid var(--line);
           vertical-align: top; }
  th { font-weight: 600; font-size: .8rem; color: var(--muted); text-transform: uppercase; }
  code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: .85rem; }
  .state { display: inline-block; padding: .05rem .5rem; border-radius: 999px; color: #fff;
           font-size: .8rem; }
  .started { background: var(--ok); } .starting, .created, .creating { background: var(--warn); }
  .stopped, .stopping, .suspended, .suspending, .destroyed, .destroying { background: var(--off); }
  .strip { display: flex; gap: 2px; flex-wrap: wrap; max-width: 28rem; }
  .tick { font-size: .72rem; padding: 0 .3rem; border-radius: 3px; background: #eef2ff; }
  ol { margin: 0; padding: 0; list-style: none; background: #fff; }
  li { padding: .25rem .6rem; border-bottom: 1px solid var(--line); }
</style>
</head>
<body>
<h1>flyfn dev <span class="muted">live</span></h1>
<div class="muted" id="updated">connecting ...</div>
<h2>Machines</h2>
<table>
  <thead><tr><th>Machine</th><th>group</th><th>state</th><th>image</th><th>region</th>
  <th>starts and stops (newest first)</th></tr></thead>
  <tbody id="machines"></tbody>
</table>
<h2>Pools <span class="muted">(function Machines per group and region)</span></h2>
<table>
  <thead><tr><th>group</th><th>region</th><th>Machines</th><th>started</th></tr></thead>
  <tbody id="pools"></tbody>
</table>
<h2>Machine time and cost <span class="muted" id="cost-window"></span></h2>
<table id="costs-table">
  <thead id="costs-head"></thead>
  <tbody id="costs"></tbody>
</table>
<h2>Tasks</h2>
<table>
  <thead><tr><th>group</th><th>figures</th></tr></thead>
  <tbody id="tasks"></tbody>
</table>
<h2>Recent routes</h2>
<ol id="routes" class="mono"></ol>
<script>
"use strict";
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
};
const clock = (seconds) => new Date(seconds * 1000).toLocaleTimeString();
const LIFECYCLE = new Set(["start", "stop", "exit", "launch", "update", "suspend", "destroy"]);
function draw(state) {
  const machines = document.getElementById("machines");
  machines.replaceChildren(...state.machines.map((m) => {
    const ticks = m.events.filter((e) => LIFECYCLE.has(e.type)).slice(0, 8)
      .map((e) => el("span", {class: "tick", title: e.type || ""},
        `${clock(e.at)} ${e.status || e.type}`));
    return el("tr", {"data-machine": m.id, "data-state": m.state},
      el("td", {}, el("code", {}, m.id), " ", el("span", {class: "muted"}, m.name || "")),
      el("td", {}, m.group || el("span", {class: "muted"}, "app")),
      el("td", {}, el("span", {class: `state ${m.state}`}, m.state)),
      el("td", {}, el("code", {}, m.image || "")),
      el("td", {}, m.region || ""),
      el("td", {}, el("div", {class: "strip"}, ...ticks)));
  }));
  document.getElementById("pools").replaceChildren(...(state.pools.length ? state.pools.map((p) =>
    el("tr", {"data-group": p.group, "data-region": p.region},
      el("td", {}, p.group), el("td", {}, p.region),
      el("td", {class: "mono"}, String(p.machines)), el("td", {class: "mono"}, String(p.started))))
    : [el("tr", {}, el("td", {colspan: "4", class: "muted"}, "no function Machines yet"))]));
  const costs = state.costs;
  const regionAt = costs.header.indexOf("REGION");  // a column only in a multi-region stack
  document.getElementById("cost-window").textContent =
    `(${costs.window}; Fly's published prices, estimates)`;
  document.getElementById("costs-head").replaceChildren(
    el("tr", {}, ...costs.header.map((h) => el("th", {}, h.toLowerCase()))));
  document.getElementById("costs").replaceChildren(...(costs.rows.length ? costs.rows.map((row) =>
    el("tr", {"data-group": row[0], ...(regionAt < 0 ? {} : {"data-region": row[regionAt]})},
      ...row.map((cell) => el("td", {class: "mono"}, cell))))
    : [el("tr", {}, el("td", {colspan: String(costs.header.length), class: "muted"},
      "no function Machines yet"))]));
  const tasks = document.getElementById("tasks");
  const groups = Object.entries(state.tasks);
  tasks.replaceChildren(...(groups.length ? groups.map(([group, figures]) =>
    el("tr", {}, el("td", {}, group), el("td", {class: "mono"},
      Object.entries(figures).map(([k, v]) => `${k} ${v ?? "-"}`).join(" · "))))
    : [el("tr", {}, el("td", {colspan: "2", class: "muted"}, "no tasks"))]));
  document.getElementById("routes").replaceChildren(...state.routes.slice(0, 60).map((r) =>
    el("li", {}, el("span", {class: "muted"}, clock(r.at) + "  "), r.line)));
  document.getElementById("updated").textContent =
    `updated ${clock(state.now)} · ${state.machines.length} Machines`;
}
async function poll() {
  try {
    const response = await fetch("state.json", {cache: "no-store"});
    if (response.ok) draw(await response.json());
  } catch (error) {
    document.getElementById("updated").textContent = "flyfn dev is not answering";
  }
  setTimeout(poll, 500);
}
poll();
</script>
</body>
</html>
"""
