"""flyfn.names: which group names are accepted, and what the error says."""

from __future__ import annotations

from typing import Any

import pytest

from flyfn.names import validate_group_name


@pytest.mark.parametrize("group", ["default", "pdf", "a", "heavy-jobs", "x_2", "a" * 30])
def test_valid_group_names(group: str) -> None:
    assert validate_group_name(group) == group


@pytest.mark.parametrize("group", ["", "PDF", "-x", "a b", "a" * 31, None, "é"])
def test_invalid_group_names(group: Any) -> None:
    with pytest.raises(ValueError, match="invalid group name"):
        validate_group_name(group)


def test_the_error_says_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"starting with a letter or digit$"):
        validate_group_name("-x")
