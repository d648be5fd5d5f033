"""Custom instruments on the native fast path."""

from __future__ import annotations

from collections.abc import Sequence

from meterage import _native
from meterage._validate import check_name, check_text


def histogram(
    name: str,
    *,
    unit: str = "",
    description: str = "",
    boundaries: Sequence[float] | None = None,
) -> _native.Histogram:
    """A histogram of custom values (int or float, finite, not negative).

    ``boundaries``: the explicit bucket boundaries exporters give it (OpenTelemetry's
    advisory boundaries; a reader's own explicit boundaries still win): 1 to 64 finite,
    non-negative numbers in strictly increasing order, or None for the SDK's default ones.
    The counts are exact for every set of ``meterage.BOUNDARIES``. The first call for a
    name fixes its unit, description and boundaries.

    >>> import meterage
    >>> tokens = meterage.histogram("example.tokens", unit="{token}")
    >>> tokens.record(512, attributes={"model": "small"})
    >>> tokens.snapshot({"model": "small"}).count
    1
    >>> sizes = meterage.histogram(
    ...     "example.sizes", unit="By", boundaries=meterage.BOUNDARIES["bytes"]
    ... )
    >>> sizes.boundaries[:3]
    (0.0, 1024.0, 4096.0)
    """
    check_name("the histogram name", name)
    return _native.Histogram(
        name, check_text("unit", unit), check_text("description", description), boundaries
    )


def counter(name: str, *, unit: str = "", description: str = "") -> _native.Counter:
    """A monotonic counter.

    >>> import meterage
    >>> misses = meterage.counter("example.cache.misses")
    >>> misses.add(1)
    >>> misses.add(2, attributes={"cache": "l2"})
    >>> misses.value(), misses.value({"cache": "l2"})
    (1.0, 2.0)
    """
    check_name("the counter name", name)
    return _native.Counter(name, check_text("unit", unit), check_text("description", description))
