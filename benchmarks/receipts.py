"""Benchmark area `receipts`: the demo store's all-receipts PDF for 100, 1,000 and 10,000 purchases.

Each size gets its own SQLite database (migrated and seeded by `seed_store --purchases N`) and is
measured in a fresh interpreter, so `peak_rss_mb` (ru_maxrss) belongs to that run alone. The timed
work is what the all-receipts view does: one streamed query, one page drawn per purchase, written
to a temporary file. `canvas_floor_seconds` replays the very same canvas calls (recorded from the
same receipts beforehand) on a fresh reportlab canvas: no database, no formatting, no layout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from benchmarks.harness import RECEIPT_SIZES, JSONDict, Skipped, median, rounded
from benchmarks.runner import REPO_ROOT, area_main, child_env, log, run_python_json

DEMO_DIR = REPO_ROOT / "demo_store"
NEEDED = ("manage.py", "store/receipts.py", "store/management/commands/seed_store.py")


def demo_env(db_path: Path) -> dict[str, str]:
    env = child_env(
        {
            "DJANGO_SETTINGS_MODULE": "demo_store.settings",
            "DATABASE_URL": f"sqlite:///{db_path}",
            "SECRET_KEY": "flyfn-benchmarks-not-secret",
            "LOG_LEVEL": "WARNING",
        },
        drop=("DEBUG",),
    )
    env["PYTHONPATH"] = os.pathsep.join([str(DEMO_DIR), env["PYTHONPATH"]])
    return env


def _manage(args: Sequence[str], env: dict[str, str], timeout: float) -> None:
    import subprocess

    subprocess.run(
        [sys.executable, str(DEMO_DIR / "manage.py"), *args],
        env=env,
        cwd=DEMO_DIR,
        check=True,
        timeout=timeout,
        stdout=subprocess.DEVNULL,
    )


def run(quick: bool) -> JSONDict:
    missing = [name for name in NEEDED if not (DEMO_DIR / name).exists()]
    if missing:
        raise Skipped(f"demo_store is missing {', '.join(missing)}")
    sizes = RECEIPT_SIZES[:2] if quick else RECEIPT_SIZES
    out: JSONDict = {}
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="flyfn-bench-receipts-") as tmp:
            env = demo_env(Path(tmp) / "db.sqlite3")
            log(f"receipts: seeding {size} purchases")
            _manage(["migrate", "-v", "0"], env, timeout=120)
            _manage(["seed_store", "--purchases", str(size), "-v", "0"], env, timeout=300)
            log(f"receipts: measuring {size}")
            result_file = Path(tmp) / "result.json"
            out[str(size)] = run_python_json(
                ["-m", "benchmarks.receipts", "measure", str(size), "--out", str(result_file)],
                env=env,
                timeout=300,
                out=result_file,
            )
    if quick:
        out["note"] = f"--quick measures {', '.join(map(str, sizes))} purchases only"
    return out


class CanvasRecorder:
    """Stands in for reportlab's Canvas and records every call made on it, in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.init_kwargs = dict(kwargs)
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        RECORDERS.append(self)

    def __getattr__(self, name: str) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, args, kwargs))

        return record


RECORDERS: list[CanvasRecorder] = []


def replay_on_canvas(recorder: CanvasRecorder, out: IO[bytes]) -> None:
    from reportlab.pdfgen.canvas import Canvas

    canvas = Canvas(out, **recorder.init_kwargs)
    for name, args, kwargs in recorder.calls:
        getattr(canvas, name)(*args, **kwargs)


def measure(size: int, repeats: int) -> JSONDict:
    """In a fresh interpreter: time the receipts, then the canvas floor for the same pages."""
    import django

    django.setup()
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    # The demo's `store` app is importable only with demo_store/ on the path (set by demo_env).
    receipts_module: Any = importlib.import_module("store.receipts")
    purchase_model: Any = importlib.import_module("store.models").Purchase
    iter_receipts = receipts_module.iter_receipts
    write_receipts = receipts_module.write_receipts

    purchases = purchase_model.objects.count()
    if purchases != size:
        raise RuntimeError(f"expected {size} purchases in the database, found {purchases}")
    with tempfile.TemporaryFile() as warm:  # fonts, connection and code paths loaded once
        write_receipts(
            iter_receipts(
                purchase_model.objects.filter(pk=purchase_model.objects.order_by("id")[:1])
            ),
            warm,
            machine="bench",
        )

    timings: list[float] = []
    cpu: list[float] = []
    pages = queries = pdf_bytes = 0
    for _ in range(repeats):
        with tempfile.TemporaryFile() as pdf, CaptureQueriesContext(connection) as ctx:
            start, cpu_start = time.perf_counter(), time.process_time()
            pages = write_receipts(
                iter_receipts(purchase_model.objects.all()), pdf, machine="bench"
            )
            timings.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
            queries = len(ctx.captured_queries)
            pdf_bytes = pdf.tell()
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    # Record the same drawing, untimed, then time only the canvas calls.
    everything = list(iter_receipts(purchase_model.objects.all()))
    real_canvas = receipts_module.Canvas
    receipts_module.Canvas = CanvasRecorder
    try:
        with tempfile.TemporaryFile() as unused:
            write_receipts(everything, unused, machine="bench")
    finally:
        receipts_module.Canvas = real_canvas
    recorder = RECORDERS[-1]
    floors: list[float] = []
    floors_cpu: list[float] = []
    for _ in range(repeats):
        with tempfile.TemporaryFile() as pdf:
            start, cpu_start = time.perf_counter(), time.process_time()
            replay_on_canvas(recorder, pdf)
            floors.append(time.perf_counter() - start)
            floors_cpu.append(time.process_time() - cpu_start)
    seconds = median(timings)
    return {
        "seconds": rounded(seconds, 4),
        "pages_per_second": rounded(pages / seconds, 1),
        "peak_rss_mb": rounded(peak_rss_mb, 1),
        "queries": queries,
        "canvas_floor_seconds": rounded(median(floors), 4),
        # CPU seconds too: on a shared machine wall time also counts the other processes' turns.
        "cpu_seconds": rounded(median(cpu), 4),
        "canvas_floor_cpu_seconds": rounded(median(floors_cpu), 4),
        "pages": pages,
        "pdf_bytes": pdf_bytes,
        "repeats": repeats,
        "canvas_calls": len(recorder.calls),
    }


def measure_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.receipts measure")
    parser.add_argument("size", type=int)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    repeats = 3
    args.out.write_text(json.dumps(measure(args.size, repeats)))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["measure"]:
        sys.exit(measure_main(sys.argv[2:]))
    sys.exit(area_main(run))
