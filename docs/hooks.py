"""MkDocs hooks (mkdocs.yml `hooks:`): the parts of the documentation generated from the code.

A page's `<!-- flyfn:settings -->` becomes the settings reference, read from the fields of
flyfn.conf's pydantic models (their docstrings are the field descriptions), so it cannot drift;
`<!-- flyfn:modules -->` lists flyfn's modules with the first paragraph of each one's docstring;
`<!-- flyfn:benchmark-results -->` shows benchmarks/results/latest.json when `make bench` left one.
A field without a description is an error: the strict build fails rather than document a blank.
"""

from __future__ import annotations

import ast
import json
import sys
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks/ is part of the repository, not of the package

from benchmarks import harness  # noqa: E402
from flyfn import conf, group_settings  # noqa: E402

SETTINGS = "<!-- flyfn:settings -->"
MODULES = "<!-- flyfn:modules -->"
BENCHMARK_RESULTS = "<!-- flyfn:benchmark-results -->"
RESULTS_PATH = ROOT / "benchmarks" / "results" / "latest.json"


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    """MkDocs event: fill in the generated parts of one page."""
    if SETTINGS in markdown:
        markdown = markdown.replace(SETTINGS, settings_reference())
    if MODULES in markdown:
        markdown = markdown.replace(MODULES, module_table(ROOT / "flyfn"))
    if BENCHMARK_RESULTS in markdown:
        markdown = markdown.replace(BENCHMARK_RESULTS, benchmark_results(RESULTS_PATH))
    return markdown


# -- the settings reference ------------------------------------------------------------------------


def settings_reference() -> str:
    """One table per settings model: `FLYFN` keys, a group's options, a group's guest options."""
    sections: list[tuple[str, str, type[BaseModel], bool]] = [
        ("flyfn-keys", "`FLYFN = {...}` in settings.py", conf.FlyfnSettings, True),
        ("group-options", '`FLYFN["GROUPS"]["<group>"] = {...}`', conf.GroupSettings, False),
        ("guest-options", '`FLYFN["GROUPS"]["<group>"]["guest"]`', conf.GuestSettings, False),
        (
            "http-options",
            '`FLYFN["GROUPS"]["<group>"]["http_options"]`',
            group_settings.HttpOptionsSettings,
            False,
        ),
        (
            "http-response-options",
            '`FLYFN["GROUPS"]["<group>"]["http_options"]["response"]`',
            group_settings.HttpResponseSettings,
            False,
        ),
    ]
    parts = []
    for anchor, title, model, top_level in sections:
        rows = [
            [
                f"`{field.alias or name}`",
                _accepts(field),
                _default(field, top_level),
                _why(name, field),
            ]
            for name, field in model.model_fields.items()
        ]
        table = markdown_table(["key", "accepts", "default", "why"], rows)
        parts.append(f"### {title} {{#{anchor}}}\n\n{table}")
    return "\n\n".join(parts)


def _why(name: str, field: FieldInfo) -> str:
    if not field.description:
        raise ValueError(f"flyfn.conf: the setting {name!r} has no docstring to document it")
    return " ".join(field.description.split())


def _default(field: FieldInfo, top_level: bool) -> str:
    value = field.get_default(call_default_factory=True)
    shown = "" if value is None and field.alias in conf._ENV_DEFAULTS else f"`{_literal(value)}`"
    env = conf._ENV_DEFAULTS.get(field.alias or "") if top_level else None
    if env:
        return f"env `{env}`" + (f", else {shown}" if shown else "")
    return shown


def _literal(value: Any) -> str:
    """A value as written in settings.py."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int) and value >= 10_000:
        return f"{value:_}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _accepts(field: FieldInfo) -> str:
    annotation = field.annotation
    choices = _literal_choices(annotation)
    if choices:
        return " or ".join(f"`{json.dumps(c)}`" for c in choices)
    bounds = [_bound(m) for m in field.metadata]
    kind = _kind(annotation)
    shown = ", ".join(b for b in bounds if b)
    return f"{kind}{f' ({shown})' if shown else ''}"


def _literal_choices(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return ()


def _bound(metadata: object) -> str:
    if isinstance(metadata, annotated_types.Ge):
        return f"≥ {_literal(metadata.ge)}"
    if isinstance(metadata, annotated_types.Gt):
        return f"> {_literal(metadata.gt)}"
    if isinstance(metadata, annotated_types.Le):
        return f"≤ {_literal(metadata.le)}"
    if isinstance(metadata, annotated_types.MultipleOf):
        return f"a multiple of {_literal(metadata.multiple_of)}"
    return ""


def _kind(annotation: Any) -> str:
    optional = get_origin(annotation) in (types.UnionType,) and type(None) in get_args(annotation)
    inner = [a for a in get_args(annotation) if a is not type(None)] if optional else [annotation]
    base = inner[0] if len(inner) == 1 else annotation
    names: dict[Any, str] = {
        str: "string",
        int: "integer",
        float: "number of seconds",
        bool: "`True` or `False`",
        SecretStr: "string (secret)",
    }
    if base in names:
        kind = names[base]
    elif isinstance(base, type) and issubclass(base, BaseModel):
        kind = "dict of the options below"
    elif get_origin(base) is tuple:
        kind = "list of names"
    elif get_origin(base) is dict:
        kind = "dict"
    else:
        kind = str(base)
    return f"{kind} or `None`" if optional else kind


# -- flyfn's modules ------------------------------------------------------------------------------


def module_table(package: Path) -> str:
    """Every module of the package (but migrations) with the first paragraph of its docstring."""
    rows = []
    for path in sorted(package.rglob("*.py")):
        if "migrations" in path.parts:  # Django writes those
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        if not docstring:
            raise ValueError(f"{path.relative_to(ROOT)} has no docstring saying what it owns")
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        first_paragraph = " ".join(docstring.split("\n\n")[0].split())
        rows.append([f"`{module}`", first_paragraph])
    return markdown_table(["module", "what it owns"], rows)


# -- benchmark results ---------------------------------------------------------------------------


def benchmark_results(path: Path) -> str:
    """The figures and targets of the latest `make bench` on this machine, if there is one."""
    if not path.exists():
        return (
            '!!! note "No local results"\n'
            f"    There is no `{path.relative_to(ROOT)}` in this checkout: run `make bench`, "
            "then `make docs`, to see this machine's figures here."
        )
    results = json.loads(path.read_text())
    machine = results["machine"]
    targets = harness.evaluate_targets(results)
    return "\n\n".join(
        [
            f"`{results['command']}` on {results['generated_at']}: {machine['cpu_model']}, "
            f"{machine['cores']} cores, Python {machine['python']}, Django {machine['django']}.",
            markdown_table(["area", "figure", "value"], harness.figure_rows(results)),
            markdown_table(
                ["target", "value", "goal", "verdict", "note"], harness.target_rows(targets)
            ),
            "\n".join(f"- `{area}`: {why}" for area, why in results.get("skipped", {}).items()),
        ]
    ).rstrip()


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])
