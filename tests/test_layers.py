"""flyfn's layering rules: Fly's protocol, the replay state and record, the naming rules and the
Machines client import no Django, and the client imports nothing of flyfn but `flyfn.fly`.

Each module's source is read, not imported: every `import` and `from ... import` node counts,
wherever it is (in a function, under `if TYPE_CHECKING:`), and relative imports are resolved.
A fresh interpreter then imports the modules, so that what they pull in at run time (the
`flyfn` package's own `__init__` included) is checked too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flyfn"

# Modules that must not import Django: the library's and the emulator's common core.
DJANGO_FREE = sorted(
    [
        *PACKAGE.glob("fly/**/*.py"),
        *PACKAGE.glob("replay*.py"),
        PACKAGE / "names.py",
        PACKAGE / "machine_time.py",
        PACKAGE / "cost_report.py",
        *PACKAGE.glob("machines/**/*.py"),
    ]
)
MACHINES = sorted(PACKAGE.glob("machines/**/*.py"))
# What the Machines client may import of flyfn.
MACHINES_MAY_IMPORT = ("flyfn.fly", "flyfn.machines")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def is_flyfn_module(name: str) -> bool:
    """Whether `name` is a module or package of flyfn (not an attribute of one)."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """The modules `source` (the text of `module`, an `__init__` if `is_package`) imports anywhere
    in it. `from a import b` is `a.b` when that is a flyfn module, else `a`; relative imports are
    resolved against `module`."""
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package_parts[: len(package_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if is_flyfn_module(candidate) else base)
    return found


def imports_of(path: Path) -> set[str]:
    return imported(path.read_text(), module_name(path), is_package=path.name == "__init__.py")


def is_under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(f"{prefix}.") for prefix in prefixes)


def test_the_rules_cover_the_modules_they_name() -> None:
    names = {module_name(path) for path in DJANGO_FREE}
    expected = {"flyfn.fly.replay", "flyfn.replay_state", "flyfn.replay_record", "flyfn.names"}
    assert expected | {"flyfn.machines.client", "flyfn.fly"} <= names
    assert {module_name(path) for path in MACHINES} >= {
        "flyfn.machines",
        "flyfn.machines.client",
        "flyfn.machines.errors",
        "flyfn.machines.models",
    }


@pytest.mark.parametrize("path", DJANGO_FREE, ids=module_name)
def test_no_django_import(path: Path) -> None:
    assert sorted(name for name in imports_of(path) if is_under(name, ("django",))) == []


@pytest.mark.parametrize("path", MACHINES, ids=module_name)
def test_the_machines_client_imports_only_flyfn_fly_of_flyfn(path: Path) -> None:
    outside = [
        name
        for name in imports_of(path)
        if is_under(name, ("flyfn",)) and not is_under(name, MACHINES_MAY_IMPORT)
    ]
    assert sorted(outside) == []


def test_imports_are_found_wherever_they_are_and_however_written() -> None:
    source = """
from __future__ import annotations
from typing import TYPE_CHECKING
import django.conf as conf
from flyfn import events
from .client import AsyncMachinesClient
from .. import conf as settings_module
from ..fly.headers import FLY_REPLAY
if TYPE_CHECKING:
    from django.http import HttpRequest
def later() -> None:
    from django.utils.crypto import constant_time_compare
    import flyfn.metrics
class Later:
    def method(self) -> None:
        from flyfn.registry import registry
"""
    assert imported(source, "flyfn.machines.models") == {
        "__future__",
        "typing",
        "django.conf",
        "django.http",
        "django.utils.crypto",
        "flyfn.events",
        "flyfn.machines.client",
        "flyfn.conf",
        "flyfn.fly.headers",
        "flyfn.metrics",
        "flyfn.registry",
    }
    package = imported("from . import client", "flyfn.machines", is_package=True)
    assert package == {"flyfn.machines.client"}


@pytest.mark.e2e  # a fresh interpreter: a process
def test_importing_them_loads_no_django_and_no_flyfn_events() -> None:
    modules = sorted({module_name(path) for path in DJANGO_FREE})
    script = (
        f"import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        f"    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(sys.modules)))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = json.loads(run.stdout)
    assert [name for name in loaded if is_under(name, ("django",))] == []
    unwanted = ("flyfn.events", "flyfn.metrics", "prometheus_client", "flyfn.conf")
    assert [name for name in loaded if is_under(name, unwanted)] == []
