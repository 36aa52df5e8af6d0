"""The rules for the names flyfn gives things: a function group's name (`validate_group_name`).

Django-free and dependency-free, so that the role, the settings, the legacy setting and the tasks
backend can check a name without importing the view registry.
"""

from __future__ import annotations

import re

__all__ = ["validate_group_name"]

# Group names end up in Machine names, metadata values and env vars: keep them plain.
_GROUP_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,29}$")


def validate_group_name(group: object) -> str:
    """`group` if it is a valid group name: 1-30 of a-z, 0-9, '-', '_', starting alphanumeric."""
    if not isinstance(group, str) or not _GROUP_RE.fullmatch(group):
        raise ValueError(
            f"invalid group name {group!r}: use 1-30 characters a-z, 0-9, '-' or '_', "
            "starting with a letter or digit"
        )
    return group
