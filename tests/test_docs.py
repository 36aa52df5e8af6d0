"""The documentation's generated parts (docs/hooks.py): the settings reference, the module list and
the benchmark results say what the code and the results file say."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from pydantic.fields import FieldInfo

from flyfn import conf
from flyfn.group_settings import HttpOptionsSettings, HttpResponseSettings

ROOT = Path(__file__).resolve().parent.parent


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flyfn_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _hooks()


def _row(reference: str, key: str) -> str:
    (row,) = [line for line in reference.splitlines() if line.startswith(f"| `{key}` |")]
    return row


def test_every_setting_is_documented_with_its_docstring_and_real_default() -> None:
    reference = hooks.settings_reference()
    models = (
        conf.FlyfnSettings,
        conf.GroupSettings,
        conf.GuestSettings,
        HttpOptionsSettings,
        HttpResponseSettings,
    )
    for model in models:
        for name, field in model.model_fields.items():
            row = _row(reference, field.alias or name)
            assert field.description
            assert " ".join(field.description.split()) in row
    assert '| env `FLY_API_HOSTNAME`, else `"https://api.machines.dev"` |' in _row(
        reference, "API_HOSTNAME"
    )
    assert '| `"stop"` or `"suspend"` or `"off"` | `"stop"` |' in _row(reference, "autostop")
    assert "| `1_000_000` |" in _row(reference, "REPLAY_BODY_LIMIT")
    assert "integer (≥ 1, ≤ 100) | `1` |" in _row(reference, "machines")


def test_a_setting_without_a_docstring_fails_the_build() -> None:
    with pytest.raises(ValueError, match="'hidden' has no docstring"):
        hooks._why("hidden", FieldInfo(annotation=int, default=1))


def test_the_module_list_names_every_flyfn_module() -> None:
    table = hooks.module_table(ROOT / "flyfn")
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "flyfn").rglob("*.py")
        if "migrations" not in p.parts
    }
    assert {line.split("`")[1] for line in table.splitlines()[2:]} == modules
    assert "| `flyfn.conf` | The flyfn settings:" in table


def test_benchmark_results_show_the_file_or_say_how_to_make_one(tmp_path: Path) -> None:
    missing = hooks.benchmark_results(hooks.ROOT / "benchmarks" / "results" / "no-such.json")
    assert "run `make bench`" in missing

    results = {
        "generated_at": "2026-12-01T10:00:00+00:00",
        "command": "python -m benchmarks --quick",
        "machine": {"cpu_model": "Test CPU", "cores": 2, "python": "3.11.7", "django": "5.2"},
        "skipped": {"receipts": "skipped: not selected (--only)"},
        "middleware": {"passthrough_overhead_ratio": 1.021},
    }
    path = tmp_path / "latest.json"
    path.write_text(json.dumps(results))
    shown = hooks.benchmark_results(path)
    assert shown.startswith("`python -m benchmarks --quick` on 2026-12-01T10:00:00+00:00: Test CPU")
    assert "| middleware | passthrough_overhead_ratio | 1.021 |" in shown
    assert "- `receipts`: skipped: not selected (--only)" in shown
