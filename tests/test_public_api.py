"""The public surface is what docs/api.md lists: every name of its import block imports, the
small public modules export exactly their documented names, the internal packages nothing."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _import_block() -> str:
    match = re.search(r"```python\n(.*?)```", API_PAGE.read_text(), re.S)
    assert match is not None, "docs/api.md has no python block"
    return match.group(1)


def _documented() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for module, imported in re.findall(r"^from (\S+) import (.+)$", _import_block(), re.M):
        names.setdefault(module, set()).update(n.strip() for n in imported.split(","))
    return names


def test_every_documented_name_is_importable_from_its_module() -> None:
    missing = [
        f"{module}.{name}"
        for module, names in _documented().items()
        for name in sorted(names)
        if not hasattr(importlib.import_module(module), name)
    ]
    assert not missing


@pytest.mark.parametrize(
    "module", ["flyfn", "flyfn.middleware", "flyfn.tasks"], ids=lambda m: str(m)
)
def test_a_small_public_module_exports_exactly_what_the_page_lists(module: str) -> None:
    exported = set(importlib.import_module(module).__all__)
    assert exported == _documented()[module]


@pytest.mark.parametrize("package", ["flyfn.pool", "flyfn.emulator.proxy"])
def test_an_internal_package_exports_nothing(package: str) -> None:
    imported = importlib.import_module(package)
    public = {name for name in vars(imported) if not name.startswith("_")}
    submodules = {name for name in public if type(getattr(imported, name)).__name__ == "module"}
    assert not hasattr(imported, "__all__")
    assert public == submodules  # only the submodules Python itself sets on the package
