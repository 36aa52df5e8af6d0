"""`python -m benchmarks`: run every benchmark area, print a table, write results/latest.json."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.harness import (
    AREAS,
    JSONDict,
    empty_area,
    evaluate_targets,
    figure_rows,
    format_table,
    machine_info,
    merge_area,
    target_rows,
    validate_results,
    write_results,
)
from benchmarks.runner import child_env, log, run_python_json

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "latest.json"

# Area -> (module, time limit in seconds for the full run, for --quick).
AREA_MODULES: dict[str, tuple[str, float, float]] = {
    "middleware": ("benchmarks.middleware", 240, 40),
    "blog_baseline": ("benchmarks.blog_vs_flyfn", 300, 60),
    "e2e": ("benchmarks.e2e", 300, 60),
    "elastic": ("benchmarks.elastic", 300, 120),
    "keep_warm": ("benchmarks.keep_warm", 180, 90),
    "receipts": ("benchmarks.receipts", 600, 90),
    "tasks": ("benchmarks.tasks", 600, 150),
    "regions": ("benchmarks.regions", 180, 90),
}


def run_area(area: str, *, quick: bool) -> tuple[JSONDict, str | None]:
    """(the area's figures, why it was skipped or failed or None)."""
    module, limit, quick_limit = AREA_MODULES[area]
    with tempfile.TemporaryDirectory(prefix="flyfn-bench-") as tmp:
        out = Path(tmp) / "out.json"
        argv = ["-m", module, "--out", str(out), *(["--quick"] if quick else [])]
        try:
            outcome = run_python_json(
                argv, env=child_env(), timeout=quick_limit if quick else limit, out=out
            )
        except (OSError, RuntimeError, TimeoutError, ValueError) as exc:
            return empty_area(area), f"failed: {exc}"
    if "result" in outcome:
        return merge_area(area, outcome["result"]), None
    if "skipped" in outcome:
        return empty_area(area), f"skipped: {outcome['skipped']}"
    return empty_area(area), f"failed: {outcome.get('error', 'no result')}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds; under one minute")
    parser.add_argument(
        "--only",
        action="append",
        choices=AREAS,
        help="run only this area (repeatable); the others are recorded as skipped",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_PATH, help="results JSON path")
    args = parser.parse_args(argv)
    chosen = args.only or list(AREAS)

    results: JSONDict = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "machine": machine_info(),
        "skipped": {},
    }
    started = time.perf_counter()
    for area in AREAS:
        if area not in chosen:
            results[area] = empty_area(area)
            results["skipped"][area] = "skipped: not selected (--only)"
            continue
        log(f"{area}: running")
        t0 = time.perf_counter()
        results[area], why = run_area(area, quick=args.quick)
        log(f"{area}: {why or 'done'} in {time.perf_counter() - t0:.1f}s")
        if why:
            results["skipped"][area] = why
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    targets = evaluate_targets(results)
    results["targets"] = [t.as_json() for t in targets]

    problems = validate_results(results)
    if problems:  # a bug in an area module, not a slow machine: fail loudly
        print("results are malformed:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    write_results(results, args.out)

    machine = results["machine"]
    print(
        f"flyfn benchmarks ({results['command']}) on {machine['cpu_model']}, "
        f"{machine['cores']} cores, Python {machine['python']}, Django {machine['django']}"
    )
    print()
    print(format_table(figure_rows(results), ["area", "figure", "value"]))
    print()
    print(format_table(target_rows(targets), ["target", "value", "goal", "verdict", "note"]))
    for area, why in results["skipped"].items():
        print(f"{area}: {why}")
    print(f"\nwrote {args.out} ({results['elapsed_s']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
