"""Pure helpers of the benchmark harness: statistics, the results schema, targets, the table.

Nothing here starts a process or times anything; the area modules do that and report plain
dicts that these helpers check, compare with the targets of issue 6 and print.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

JSONDict = dict[str, Any]

RECEIPT_SIZES: tuple[int, ...] = (100, 1_000, 10_000)

# The keys every results file carries; a skipped area keeps them with null values.
AREA_KEYS: dict[str, tuple[str, ...]] = {
    "middleware": (
        "bare_us",
        "flyfn_passthrough_us",
        "flyfn_replay_decision_us",
        "passthrough_overhead_ratio",
        "decision_vs_bare_ratio",
        "metrics_passthrough_vs_off_ratio",
        "metrics_decision_vs_off_ratio",
    ),
    "blog_baseline": (
        "api_calls_per_1000_requests",
        "machines_after_50_cold_requests",
        "requests_per_second",
    ),
    "e2e": (
        "direct_p50_ms",
        "direct_p99_ms",
        "replay_p50_ms",
        "replay_p99_ms",
        "cold_start_s",
        "app_boot_s",
        "direct_requests_per_second",
        "replay_requests_per_second",
        "replay_vs_direct_throughput_ratio",
    ),
    "elastic": (
        "fixed_scale_total_s",
        "elastic_scale_total_s",
        "fixed_warm_total_s",
        "elastic_warm_total_s",
        "elastic_scale_machines",
        "warm_total_s_elastic_vs_fixed_ratio",
        "warm_p99_ms_elastic_vs_fixed_ratio",
        "trickle_machines",
        "all_stopped_after_s",
    ),
    "keep_warm": (
        "cold_first_request_s",
        "warm_first_request_s",
        "saved_s",
        "warmth_usd_per_month",
    ),
    "receipts": tuple(str(n) for n in RECEIPT_SIZES),
    # Replays for a visitor in syd under `flyfn dev --regions iad,syd`: to a function Machine in
    # syd (the group follows the caller) and in iad (the primary region), in the same run.
    "regions": (
        "same_region_replay_p50_ms",
        "cross_region_replay_p50_ms",
        "cross_minus_same_p50_ms",
        "emulated_round_trip_ms",
    ),
    # flyfn.tasks beside django-tasks-db's own worker (db_worker); the ratios are flyfn's figure
    # over the worker's, in the same run.
    "tasks": (
        "enqueue_p50_ms",
        "tasks_per_second",
        "warm_enqueue_to_start_s",
        "cold_enqueue_to_start_s",
        "enqueue_p50_ratio",
        "tasks_per_second_ratio",
        "warm_start_ratio",
        "cold_start_ratio",
    ),
}
SIDE_BY_SIDE = ("flyfn", "blog")
TASKS_SIDES = ("flyfn", "db_worker")
# The tasks figures measured on both sides (the ratios are single numbers).
TASKS_PAIRED = AREA_KEYS["tasks"][:4]
RECEIPT_KEYS = ("seconds", "pages_per_second", "peak_rss_mb", "queries", "canvas_floor_seconds")
AREAS: tuple[str, ...] = tuple(AREA_KEYS)


class Skipped(Exception):
    """An area (or part of one) cannot run here; the message says why."""


def median(values: Iterable[float]) -> float:
    data = list(values)
    if not data:
        raise ValueError("median of no values")
    return float(statistics.median(data))


def percentile(values: Iterable[float], pct: float) -> float:
    """Linear-interpolated percentile (pct in 0..100), as numpy's default method."""
    data = sorted(values)
    if not data:
        raise ValueError("percentile of no values")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be within 0..100, got {pct}")
    rank = (len(data) - 1) * pct / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    return data[low] + (data[high] - data[low]) * (rank - low)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def per_thousand(count: int, requests: int) -> float:
    if requests <= 0:
        raise ValueError("per_thousand needs at least one request")
    return count * 1000 / requests


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def empty_area(area: str) -> JSONDict:
    """The area's keys, every value null: what a skipped area records."""
    if area == "blog_baseline":
        return {key: dict.fromkeys(SIDE_BY_SIDE) for key in AREA_KEYS[area]}
    if area == "receipts":
        return {key: dict.fromkeys(RECEIPT_KEYS) for key in AREA_KEYS[area]}
    if area == "tasks":
        return {
            key: dict.fromkeys(TASKS_SIDES) if key in TASKS_PAIRED else None
            for key in AREA_KEYS[area]
        }
    return dict.fromkeys(AREA_KEYS[area])


def merge_area(area: str, measured: Mapping[str, Any]) -> JSONDict:
    """The area's template overlaid with what was measured (extra keys are kept)."""
    out = empty_area(area)
    for key, value in measured.items():
        if isinstance(out.get(key), dict) and isinstance(value, Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def validate_results(results: Mapping[str, Any]) -> list[str]:
    """Problems with a results document's shape (an empty list means it is well formed)."""
    problems: list[str] = []
    for top in ("machine", "targets", "skipped", *AREAS):
        if top not in results:
            problems.append(f"missing top-level key {top!r}")
    for area in AREAS:
        section = results.get(area)
        if not isinstance(section, Mapping):
            if area in results:
                problems.append(f"{area}: not an object")
            continue
        for key in AREA_KEYS[area]:
            if key not in section:
                problems.append(f"{area}.{key}: missing")
                continue
            value = section[key]
            inner: tuple[str, ...] = ()
            if area == "blog_baseline":
                inner = SIDE_BY_SIDE
            elif area == "receipts":
                inner = RECEIPT_KEYS
            elif area == "tasks" and key in TASKS_PAIRED:
                inner = TASKS_SIDES
            if inner:
                if not isinstance(value, Mapping):
                    problems.append(f"{area}.{key}: not an object")
                    continue
                for sub in inner:
                    if sub not in value:
                        problems.append(f"{area}.{key}.{sub}: missing")
                    elif not _is_number_or_null(value[sub]):
                        problems.append(f"{area}.{key}.{sub}: not a number or null")
            elif not _is_number_or_null(value):
                problems.append(f"{area}.{key}: not a number or null")
    return problems


def _is_number_or_null(value: object) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


@dataclass(frozen=True)
class TargetResult:
    name: str
    value: str
    target: str
    met: bool | None  # None: not measured, so neither met nor missed
    note: str = ""

    def as_json(self) -> JSONDict:
        return {
            "name": self.name,
            "value": self.value,
            "target": self.target,
            "met": self.met,
            "note": self.note,
        }


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if float(value).is_integer():
        return str(int(value))
    return (
        f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    )


def _get(results: Mapping[str, Any], *path: str) -> float | None:
    node: Any = results
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node if _is_number_or_null(node) else None


def _check(
    name: str,
    value: float | None,
    target_text: str,
    bound: float | None,
    compare: Callable[[float, float], bool],
    miss_note: Callable[[float, float], str],
) -> TargetResult:
    if value is None or bound is None:
        return TargetResult(name, _fmt(value), target_text, None, "not measured")
    met = compare(value, bound)
    return TargetResult(name, _fmt(value), target_text, met, "" if met else miss_note(value, bound))


def _at_most(value: float, bound: float) -> bool:
    return value <= bound


def _over_by(value: float, bound: float) -> str:
    return f"over by {_fmt(value - bound)}"


def evaluate_targets(results: Mapping[str, Any]) -> list[TargetResult]:
    """Compare measured figures with the targets of issue 6 §1."""
    out: list[TargetResult] = []
    mw = ("middleware",)
    out.append(
        _check(
            "middleware passthrough_overhead_ratio",
            _get(results, *mw, "passthrough_overhead_ratio"),
            "<= 1.03",
            1.03,
            _at_most,
            _over_by,
        )
    )
    out.append(
        _check(
            "middleware decision_vs_bare_ratio",
            _get(results, *mw, "decision_vs_bare_ratio"),
            "<= 1.10",
            1.10,
            _at_most,
            _over_by,
        )
    )
    for name, bound in (("passthrough", 1.05), ("decision", 1.10)):
        out.append(
            _check(
                f"middleware {name} with metrics on vs off",
                _get(results, *mw, f"metrics_{name}_vs_off_ratio"),
                f"<= {bound}",
                bound,
                _at_most,
                _over_by,
            )
        )
    bb = ("blog_baseline",)
    blog_calls = _get(results, *bb, "api_calls_per_1000_requests", "blog")
    out.append(
        _check(
            "flyfn API calls per 1000 warm requests",
            _get(results, *bb, "api_calls_per_1000_requests", "flyfn"),
            f"<= 1 (blog: {_fmt(blog_calls)})",
            1.0,
            _at_most,
            _over_by,
        )
    )
    blog_machines = _get(results, *bb, "machines_after_50_cold_requests", "blog")
    out.append(
        _check(
            "flyfn Machines after 50 cold requests",
            _get(results, *bb, "machines_after_50_cold_requests", "flyfn"),
            f"== 1 (blog: {_fmt(blog_machines)})",
            1.0,
            lambda v, b: v == b,
            lambda v, b: f"{_fmt(v)} Machines instead of {_fmt(b)}",
        )
    )
    direct_p50 = _get(results, "e2e", "direct_p50_ms")
    out.append(
        _check(
            "e2e replay_p50_ms",
            _get(results, "e2e", "replay_p50_ms"),
            f"<= 2 x direct_p50 + 2 ({_fmt(direct_p50)} ms direct)",
            None if direct_p50 is None else 2 * direct_p50 + 2,
            _at_most,
            lambda v, b: f"over by {_fmt(v - b)} ms",
        )
    )
    direct_rps = _get(results, "e2e", "direct_requests_per_second")
    out.append(
        _check(
            "e2e replayed throughput vs direct",
            _get(results, "e2e", "replay_vs_direct_throughput_ratio"),
            f">= 0.4 (two proxy hops for one; {_fmt(direct_rps)} req/s direct)",
            0.4,
            lambda v, b: v >= b,
            lambda v, b: f"under by {_fmt(b - v)}",
        )
    )
    boot = _get(results, "e2e", "app_boot_s")
    out.append(
        _check(
            "e2e cold_start_s",
            _get(results, "e2e", "cold_start_s"),
            f"<= app_boot_s + 0.5 ({_fmt(boot)} s boot)",
            None if boot is None else boot + 0.5,
            _at_most,
            lambda v, b: f"over by {_fmt(v - b)} s",
        )
    )
    for size in AREA_KEYS["receipts"]:
        floor = _get(results, "receipts", size, "canvas_floor_seconds")
        out.append(
            _check(
                f"receipts {size} seconds",
                _get(results, "receipts", size, "seconds"),
                f"<= 2 x canvas floor ({_fmt(floor)} s)",
                None if floor is None else 2 * floor,
                _at_most,
                lambda v, b: f"{v / b * 2:.2f}x the floor, over by {_fmt(v - b)} s",
            )
        )
    sizes = AREA_KEYS["receipts"]
    small = _get(results, "receipts", sizes[0], "queries")
    large = _get(results, "receipts", sizes[-1], "queries")
    out.append(
        _check(
            f"receipts queries {sizes[0]} vs {sizes[-1]}",
            large,
            f"== queries at {sizes[0]} ({_fmt(small)})",
            small,
            lambda v, b: v == b,
            lambda v, b: f"{_fmt(v)} queries at {sizes[-1]} vs {_fmt(b)} at {sizes[0]}",
        )
    )
    return out


def machine_info() -> JSONDict:
    """The machine the figures came from."""
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "django": _version("Django"),
        "reportlab": _version("reportlab"),
        "httpx": _version("httpx"),
        "uvicorn": _version("uvicorn"),
        "flyfn": _version("flyfn"),
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain aligned text table."""
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def figure_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """(area, figure, value) rows for every measured figure, baseline beside flyfn's."""
    rows: list[list[str]] = []
    for area in AREAS:
        section = results.get(area)
        if not isinstance(section, Mapping):
            continue
        for key in AREA_KEYS[area]:
            value = section.get(key)
            if area == "blog_baseline" and isinstance(value, Mapping):
                rows.append(
                    [
                        area,
                        key,
                        f"flyfn {_fmt(value.get('flyfn'))} | blog {_fmt(value.get('blog'))}",
                    ]
                )
            elif area == "tasks" and isinstance(value, Mapping):
                sides = " | ".join(f"{side} {_fmt(value.get(side))}" for side in TASKS_SIDES)
                rows.append([area, key, sides])
            elif area == "receipts" and isinstance(value, Mapping):
                text = ", ".join(f"{k}={_fmt(value.get(k))}" for k in RECEIPT_KEYS)
                rows.append([area, f"{key} purchases", text])
            else:
                rows.append([area, key, _fmt(value)])
    return rows


def target_rows(targets: Sequence[TargetResult]) -> list[list[str]]:
    verdict = {True: "met", False: "MISSED", None: "n/a"}
    return [[t.name, t.value, t.target, verdict[t.met], t.note] for t in targets]


def write_results(results: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
