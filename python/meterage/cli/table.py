"""Plain-text formatting for the command line: human units and aligned tables."""

from __future__ import annotations

import math
from collections.abc import Sequence

_BYTE_UNITS = ("KiB", "MiB", "GiB", "TiB")


def _missing(value: float | None) -> bool:
    return value is None or math.isnan(value)


def format_seconds(seconds: float | None, *, sign: bool = False) -> str:
    """A duration in ns, µs, ms or s with three significant digits ("1.23 ms")."""
    if _missing(seconds):
        return "n/a"
    assert seconds is not None
    prefix = ("+" if seconds >= 0 else "-") if sign else ("-" if seconds < 0 else "")
    # Round to three significant digits before picking the unit: 999.96 µs is "1.00 ms".
    magnitude = float(f"{abs(seconds):.3g}")
    for limit, scale, unit in ((1e-6, 1e9, "ns"), (1e-3, 1e6, "µs"), (1.0, 1e3, "ms")):
        if magnitude < limit:
            return prefix + _three_digits(magnitude * scale) + " " + unit
    return prefix + _three_digits(max(magnitude, abs(seconds))) + " s"


def _three_digits(value: float) -> str:
    if value >= 100 or value == 0:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_bytes(count: float | None) -> str:
    """A byte count in B, KiB, MiB, GiB or TiB ("64 KiB", "1.5 MiB")."""
    if _missing(count):
        return "n/a"
    assert count is not None
    if count < 1024:
        return f"{count:.0f} B"
    value = float(count)
    for unit in _BYTE_UNITS:
        value /= 1024
        if value < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def format_amount(value: float | None) -> str:
    """A per-call count such as faults or context switches: "0", "0.004", "1.4", "12"."""
    if _missing(value):
        return "n/a"
    assert value is not None
    if value == 0:
        return "0"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.01:
        return f"{value:.2f}"
    return f"{value:.1g}"


def format_share(share: float | None) -> str:
    """A fraction as a percentage with enough digits to be non-zero ("100%", "0.04%")."""
    if _missing(share):
        return "n/a"
    assert share is not None
    percent = share * 100
    if percent >= 99.95 or percent == 0:
        return f"{percent:.0f}%"
    if percent >= 1:
        return f"{percent:.1f}%"
    return f"{percent:.2g}%"


def render(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    left: int = 1,
    indent: str = "",
    gap: str = "  ",
) -> str:
    """Rows aligned under headers: the first ``left`` columns flush left, the rest right."""
    widths = [len(header) for header in headers]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, the table has {len(headers)} columns")
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.ljust(width) if index < left else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return (indent + gap.join(padded)).rstrip()

    rule = indent + gap.join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])
