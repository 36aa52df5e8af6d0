"""How an invalid flyfn setting is reported: `SettingsError` and its issues, each naming its key,
made from pydantic's errors in one place.

Every message shows the bad value as it would be written in settings.py, never anything near the
API token, and says what is allowed: the choices of a `Literal`, the known options of a section.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from django.core.exceptions import ImproperlyConfigured
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

__all__ = ["SettingsError", "SettingsIssue", "invalid", "issues_of", "show"]

IssueKind = Literal["value", "unknown_key", "method"]
# Where a custom error narrows its location below the field that raised it (a view's name, a
# seed entry's index, an unknown option of a view): pydantic cannot know these.
_WHERE = ("key", "index", "sub")


@dataclass(frozen=True, slots=True)
class SettingsIssue:
    """One invalid setting: where (`FLYFN["GROUPS"]["pdf"]["autostop"]`), what, and its kind.

    `kind` is `"value"` (a bad value), `"unknown_key"` (an option flyfn does not know) or
    `"method"` (an unknown HTTP method); the system checks give each kind its own id.
    """

    key: str
    message: str
    kind: str = "value"

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class SettingsError(ImproperlyConfigured):
    """The flyfn settings are invalid; `issues` lists every problem, each naming its key."""

    def __init__(self, issues: Iterable[SettingsIssue]) -> None:
        self.issues: tuple[SettingsIssue, ...] = tuple(issues)
        super().__init__("; ".join(str(issue) for issue in self.issues))


def show(value: object) -> str:
    """A value as it would be written in settings.py, short (JSON quoting for strings)."""
    text = json.dumps(value) if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def invalid(message: str, kind: IssueKind = "value", **where: Any) -> PydanticCustomError:
    """The error a validator raises for what pydantic cannot say itself; `where` (key, index,
    sub) narrows its location."""
    # The message goes through the context, so braces in user input are never format fields.
    return PydanticCustomError(f"flyfn_{kind}", "{msg}", {"msg": message, **where})


def issues_of(
    error: ValidationError,
    root: type[BaseModel],
    name_key: Mapping[str, str],
) -> list[SettingsIssue]:
    """One issue per pydantic error of validating `root`; `name_key` says how a location's
    first part is written (`{"FLYFN": 'FLYFN["APP_NAME"]'...}`, see `key_text`)."""
    items = error.errors(include_url=False)
    # A required option missing beside an unknown one is most likely that one misspelt: only the
    # unknown one is reported.
    misspelt = {item["loc"][:-1] for item in items if item["type"] == "extra_forbidden"}
    issues: list[SettingsIssue] = []
    for item in items:
        if item["type"] == "missing" and item["loc"][:-1] in misspelt:
            continue
        loc = tuple(part for part in item["loc"] if part != "[key]")
        kind, message = _kind_and_message(item, root, loc)
        ctx = item.get("ctx") or {}
        loc = (*loc, *(ctx[extra] for extra in _WHERE if extra in ctx))
        issues.append(SettingsIssue(key_text(loc, name_key), message, kind))
    return issues


def key_text(loc: Sequence[int | str], name_key: Mapping[str, str]) -> str:
    """A location as written in settings.py: `FLYFN["GROUPS"]["pdf"]`; a name in `name_key`
    (a value that came from the environment, say) is written as it says."""
    if not loc:
        return "FLYFN"
    head, *rest = loc
    if rest and f"{head}.{rest[0]}" in name_key:
        return name_key[f"{head}.{rest[0]}"]
    text = name_key.get(str(head), str(head))
    for part in rest:
        text += f"[{part}]" if isinstance(part, int) else f"[{json.dumps(part)}]"
    return text


def _kind_and_message(
    item: Any, root: type[BaseModel], loc: tuple[int | str, ...]
) -> tuple[str, str]:
    kind: str = item["type"]
    if kind.startswith("flyfn_"):
        return kind.removeprefix("flyfn_"), str(item["ctx"]["msg"])
    value = item.get("input")
    if kind == "extra_forbidden":
        section = _type_at(root, loc[:-1])
        known = ", ".join(show(name) for name in _options(section))
        return "unknown_key", f"unknown option; known options: {known}"
    if kind in {"model_type", "dict_type"}:
        return "value", f"must be a dict (got {type(value).__name__})"
    if kind == "literal_error":
        allowed = ", ".join(show(choice) for choice in get_args(_type_at(root, loc)))
        return "value", f"must be one of {allowed} (got {show(value)})"
    # Pydantic's own messages do not show the value; add it, except anywhere near the token.
    shown = "" if any("TOKEN" in str(part) for part in loc) else f" (got {show(value)})"
    return "value", item["msg"] + shown


def _options(section: Any) -> list[str]:
    if not (isinstance(section, type) and issubclass(section, BaseModel)):
        return []
    return [field.alias or name for name, field in section.model_fields.items()]


def _type_at(root: type[BaseModel], loc: Sequence[int | str]) -> Any:
    """The type the settings models declare at `loc` (None where they declare none)."""
    current: Any = root
    for part in loc:
        current = _without_none(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            fields = current.model_fields.items()
            found = [field for name, field in fields if part in (name, field.alias)]
            current = found[0].annotation if found else None
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        else:
            return None
    return _without_none(current)


def _without_none(annotation: Any) -> Any:
    """`X` for `X | None`."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation
