"""Argument checks shared by the public API: clear errors that say what is allowed."""

from __future__ import annotations

import math
from typing import Any

from meterage._native import MIN_SAMPLE


def check_name(what: str, name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError(f"{what} must not be empty")
    return name


def check_fraction(what: str, value: Any, *, minimum: float = 0.0) -> float | None:
    """None, or a number in (0, 1] (in [minimum, 1] when a minimum is given)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a float in (0, 1], not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{what} must be in (0, 1], got {value!r}") from None
    if minimum > 0 and not (math.isnan(number) or number > 1) and number < minimum:
        raise ValueError(
            f"{what} must be between {minimum:g} and 1, got {value!r}: below one call in "
            f"{1 / minimum:,.0f}, a probed call would stand for more calls than a process makes"
        )
    if math.isnan(number) or not 0 < number <= 1:
        raise ValueError(f"{what} must be in (0, 1], got {value!r}")
    return number


def check_sample(value: Any) -> float | None:
    """None, or a fixed probing rate in [MIN_SAMPLE, 1]."""
    return check_fraction("sample", value, minimum=MIN_SAMPLE)


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


def check_probe_names(probes: Any) -> tuple[str, ...] | None:
    """None, or the probe names as a tuple (the native layer checks each name)."""
    if probes is None:
        return None
    if isinstance(probes, str):
        raise TypeError(
            f'probes must be a tuple of probe names such as ("cpu", "io"), not the str {probes!r}'
        )
    try:
        return tuple(probes)
    except TypeError:
        raise TypeError(
            'probes must be a tuple of probe names such as ("cpu", "io"), not '
            f"{type(probes).__name__}"
        ) from None
