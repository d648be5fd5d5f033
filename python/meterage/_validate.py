"""Argument checks shared by the public API: clear errors that say what is allowed."""

from __future__ import annotations

import math
from typing import Any


def check_name(what: str, name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError(f"{what} must not be empty")
    return name


def check_fraction(what: str, value: Any) -> float | None:
    """None, or a number in (0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a float in (0, 1], not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{what} must be in (0, 1], got {value!r}") from None
    if math.isnan(number) or not 0 < number <= 1:
        raise ValueError(f"{what} must be in (0, 1], got {value!r}")
    return number


def check_text(what: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    return value


def check_positive_int(what: str, value: Any, *, maximum: int) -> int | None:
    """None, or an int in [1, maximum]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be a positive int, not {type(value).__name__}")
    if not 1 <= value <= maximum:
        raise ValueError(f"{what} must be between 1 and {maximum}, got {value!r}")
    return value
