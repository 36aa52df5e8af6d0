"""The benchmark harness's pure parts: statistics, results schema, targets, API call counting.

No timing is asserted here; `python -m benchmarks` measures, these tests check the arithmetic and
the shape of what it writes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

import benchmarks.__main__ as bench_main
from benchmarks import harness, keep_warm, regions
from benchmarks.apiserver import CallCounter, Message, Receive, Scope, Send, route_of
from benchmarks.e2e import DevLog
from benchmarks.receipts import CanvasRecorder, replay_on_canvas


def test_median_and_percentile() -> None:
    assert harness.median([3, 1, 2]) == 2
    assert harness.median([4, 1, 2, 3]) == 2.5
    data = list(range(1, 101))  # 1..100
    assert harness.percentile(data, 50) == pytest.approx(50.5)
    assert harness.percentile(data, 99) == pytest.approx(99.01)
    assert harness.percentile(data, 0) == 1
    assert harness.percentile(data, 100) == 100
    assert harness.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError, match="no values"):
        harness.median([])
    with pytest.raises(ValueError, match="within"):
        harness.percentile([1.0], 101)


def test_ratio_and_per_thousand() -> None:
    assert harness.ratio(103.0, 100.0) == pytest.approx(1.03)
    assert harness.ratio(None, 1.0) is None
    assert harness.ratio(1.0, None) is None
    assert harness.ratio(1.0, 0.0) is None
    assert harness.per_thousand(300, 300) == 1000
    assert harness.per_thousand(1, 5000) == 0.2
    with pytest.raises(ValueError, match="at least one"):
        harness.per_thousand(1, 0)


def test_skipped_areas_keep_every_key_as_null() -> None:
    results: dict[str, Any] = {"machine": {}, "targets": [], "skipped": {}}
    for area in harness.AREAS:
        results[area] = harness.empty_area(area)
    assert harness.validate_results(results) == []
    assert set(results["middleware"]) == {
        "bare_us",
        "flyfn_passthrough_us",
        "flyfn_replay_decision_us",
        "passthrough_overhead_ratio",
        "decision_vs_bare_ratio",
        "metrics_passthrough_vs_off_ratio",
        "metrics_decision_vs_off_ratio",
    }
    assert results["blog_baseline"]["requests_per_second"] == {"flyfn": None, "blog": None}
    assert results["receipts"]["10000"]["canvas_floor_seconds"] is None
    assert all(t.met is None for t in harness.evaluate_targets(results))


def test_merge_area_overlays_measured_values_and_keeps_extras() -> None:
    merged = harness.merge_area(
        "blog_baseline", {"requests_per_second": {"flyfn": 900.0}, "note": "x"}
    )
    assert merged["requests_per_second"] == {"flyfn": 900.0, "blog": None}
    assert merged["note"] == "x"
    assert merged["api_calls_per_1000_requests"] == {"flyfn": None, "blog": None}


def test_validate_results_reports_missing_and_mistyped_figures() -> None:
    results: dict[str, Any] = {"machine": {}, "targets": [], "skipped": {}}
    for area in harness.AREAS:
        results[area] = harness.empty_area(area)
    del results["e2e"]["cold_start_s"]
    results["middleware"]["bare_us"] = "fast"
    results["receipts"]["100"] = {"seconds": 1.0}
    problems = harness.validate_results(results)
    assert "e2e.cold_start_s: missing" in problems
    assert "middleware.bare_us: not a number or null" in problems
    assert "receipts.100.queries: missing" in problems
    del results["targets"]
    assert "missing top-level key 'targets'" in harness.validate_results(results)


def _measured() -> dict[str, Any]:
    results: dict[str, Any] = {area: harness.empty_area(area) for area in harness.AREAS}
    results["middleware"].update(passthrough_overhead_ratio=1.02, decision_vs_bare_ratio=1.2)
    results["middleware"].update(
        metrics_passthrough_vs_off_ratio=1.01, metrics_decision_vs_off_ratio=1.2
    )
    results["blog_baseline"]["api_calls_per_1000_requests"] = {"flyfn": 0.0, "blog": 1000.0}
    results["blog_baseline"]["machines_after_50_cold_requests"] = {"flyfn": 1, "blog": 7}
    results["e2e"].update(direct_p50_ms=2.0, replay_p50_ms=7.0, cold_start_s=1.0, app_boot_s=0.9)
    for size, queries in (("100", 1), ("1000", 1), ("10000", 3)):
        results["receipts"][size] = {
            "seconds": 1.0,
            "pages_per_second": 100.0,
            "peak_rss_mb": 50.0,
            "queries": queries,
            "canvas_floor_seconds": 0.4,
        }
    return results


def test_targets_met_and_missed_with_the_margin() -> None:
    by_name = {t.name: t for t in harness.evaluate_targets(_measured())}
    assert by_name["middleware passthrough_overhead_ratio"].met is True
    decision = by_name["middleware decision_vs_bare_ratio"]
    assert decision.met is False
    assert decision.note == "over by 0.1"
    assert by_name["middleware passthrough with metrics on vs off"].met is True
    assert by_name["middleware decision with metrics on vs off"].met is False
    assert by_name["flyfn API calls per 1000 warm requests"].met is True
    assert "blog: 1000" in by_name["flyfn API calls per 1000 warm requests"].target
    assert by_name["flyfn Machines after 50 cold requests"].met is True
    replay = by_name["e2e replay_p50_ms"]  # bound 2 * 2 + 2 = 6 ms
    assert replay.met is False
    assert replay.note == "over by 1 ms"
    assert by_name["e2e cold_start_s"].met is True  # 1.0 <= 0.9 + 0.5
    assert by_name["receipts 100 seconds"].met is False  # 1.0 > 2 * 0.4
    assert by_name["receipts queries 100 vs 10000"].met is False


def test_route_of_hides_app_and_machine_ids() -> None:
    assert route_of("GET", "/v1/apps/a-b/machines") == "GET /v1/apps/{app}/machines"
    assert (
        route_of("POST", "/v1/apps/a/machines/9a2c/wait")
        == "POST /v1/apps/{app}/machines/{id}/wait"
    )
    assert route_of("GET", "/v1/apps/a/machines/9a2c") == "GET /v1/apps/{app}/machines/{id}"


async def test_call_counter_counts_api_calls_but_not_the_harness_own() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    counter = CallCounter(app)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    def scope(path: str, *headers: tuple[bytes, bytes]) -> Scope:
        return {"type": "http", "method": "GET", "path": path, "headers": list(headers)}

    await counter(scope("/v1/apps/a/machines"), receive, send)
    await counter(scope("/v1/apps/a/machines"), receive, send)
    await counter(scope("/v1/apps/a/machines", (b"x-bench-uncounted", b"1")), receive, send)
    assert seen == ["/v1/apps/a/machines"] * 3
    sent.clear()
    await counter(scope("/_bench/calls"), receive, send)
    body = json.loads(sent[-1]["body"])
    assert body == {"total": 2, "by_route": {"GET /v1/apps/{app}/machines": 2}}
    await counter(scope("/_bench/reset"), receive, send)
    assert sum(counter.calls.values()) == 0


def test_canvas_recorder_replays_the_same_drawing() -> None:
    recorder = CanvasRecorder(io.BytesIO(), pagesize=(420.0, 595.0), pageCompression=0)
    recorder.setFont("Helvetica", 10)
    recorder.drawString(36, 500, "Receipt 000001")
    recorder.drawRightString(380, 480, "$12.50")
    recorder.showPage()
    recorder.save()
    assert [name for name, _, _ in recorder.calls] == [
        "setFont",
        "drawString",
        "drawRightString",
        "showPage",
        "save",
    ]
    out = io.BytesIO()
    replay_on_canvas(recorder, out)
    pdf = out.getvalue()
    assert pdf.startswith(b"%PDF")
    assert b"Receipt 000001" in pdf  # uncompressed, so the text is visible


def test_main_writes_a_valid_results_file_when_every_area_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def skipped(area: str, *, quick: bool) -> tuple[dict[str, Any], str | None]:
        return harness.empty_area(area), "skipped: not here"

    monkeypatch.setattr(bench_main, "run_area", skipped)
    # The stdlib's answer runs `uname -p` in a process: the unit set starts none.
    monkeypatch.setattr("platform.platform", lambda: "Linux-test")
    out = tmp_path / "latest.json"
    assert bench_main.main(["--quick", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert harness.validate_results(results) == []
    assert results["quick"] is True
    assert results["machine"]["cores"] >= 1
    assert results["machine"]["python"]
    assert results["skipped"] == dict.fromkeys(harness.AREAS, "skipped: not here")
    printed = capsys.readouterr().out
    assert "e2e: skipped: not here" in printed
    assert "passthrough_overhead_ratio" in printed


def test_dev_log_finds_route_lines_case_insensitively(tmp_path: Path) -> None:
    log = DevLog(tmp_path / "dev.log")
    log.path.write_text(
        "GET /fn/ main:3c03 → replay → fn:3b51 200 2 B 10ms\n"
        "autostop: fn:3b51 stopped after 2s idle\n"
        "GET /fn/ main:3c03 → replay → fn:3b51 (cold 1.4s) 200 2 B 1.8s\n"
    )
    assert log.wait_for("AUTOSTOP", after=0, timeout=0, also="fn:") == 1
    assert log.wait_for("GET /fn/", after=2, timeout=0, also="(cold") == 2
    with pytest.raises(TimeoutError):
        log.wait_for("autostop", after=2, timeout=0)


def test_regions_area_states_its_emulated_latency_and_reads_route_lines() -> None:
    # Ashburn-Sydney, ~15,700 km: 1.5 x distance / 200 km per ms, each way.
    assert 230 < regions.emulated_round_trip_ms("syd", "iad") < 240
    assert regions.emulated_round_trip_ms("syd", "syd") == 0
    same = regions.route_pattern("/fn/", "syd")
    assert same.match("[syd] GET /fn/ main:0e1f@syd → replay → fn:9a2c@syd 200 2 B 8ms")
    assert same.match(
        "[syd] GET /fn/ main:0e1f@syd (cold 0.5s) → replay → fn:9a2c@syd (cold 1s) 200"
    )
    bounced = (
        "[syd] GET /fn/ fn:9a2c@syd → elsewhere → main:0e1f@syd → replay → fn:9a2c@syd 200 2 B"
    )
    assert same.match(bounced)
    fell_back = (
        "[syd] GET /fn/ main:0e1f@syd → replay → fn:9a2c@syd ✗ timeout → fallback → "
        "main:0e1f@syd 200"
    )
    assert not same.match(fell_back)
    assert not same.match("[syd] GET /fn/ main:0e1f@syd → replay → fn:9a2c@iad 200 2 B 8ms")
    assert not same.match("[syd] GET /fn/ main:0e1f@syd 200 2 B 8ms")  # ran locally
    assert not same.match("[iad] GET /fn/ main:0e1f@iad → replay → fn:9a2c@syd 200 2 B 8ms")
    assert "regions" in bench_main.AREA_MODULES


def test_keep_warm_rounds_need_exactly_the_cold_group_s_cold_start(tmp_path: Path) -> None:
    log_file = tmp_path / "dev.log"
    log_file.write_text("autostop: fn:c01d stopped after 3s idle (pass 2)\n")

    def routes(cold_note: str, warm_note: str) -> httpx.Client:
        def answer(request: httpx.Request) -> httpx.Response:
            group = request.url.path.split("/")[2]
            note = cold_note if group == "cold" else warm_note
            with log_file.open("a") as out:
                out.write(f"GET {request.url.path} main:0001 → replay → fn:{group}{note} 200\n")
            return httpx.Response(200, text="m")

        return httpx.Client(transport=httpx.MockTransport(answer), base_url="http://bench")

    dev_log = DevLog(log_file)
    cold, warm = keep_warm.one_round(routes(" (cold 1.2s)", ""), dev_log, "c01d0000", 0)
    assert min(cold, warm) >= 0
    log_file.write_text("autostop: fn:c01d stopped after 3s idle (pass 3)\n")
    with pytest.raises(RuntimeError, match="expected one cold start"):
        keep_warm.one_round(routes(" (cold 1.2s)", " (cold 0.4s)"), dev_log, "c01d0000", 0)


def test_keep_warm_prices_the_warmth_from_the_table() -> None:
    # One shared-cpu-1x 256 MB Machine always on, less the root file system it pays stopped.
    assert keep_warm.warmth_per_month() == pytest.approx(1.945 - 0.15)
    assert bench_main.AREA_MODULES["keep_warm"][0] == "benchmarks.keep_warm"
