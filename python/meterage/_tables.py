"""The docs' tables of measures, made from the probes' declarations (``_native.PROBES``),
and of meterage's boundary sets (``_native.BOUNDARIES``).

README.md, docs/otel.md and docs/api.md hold them between ``<!-- measures: NAME -->`` and
``<!-- end measures -->``; a test fails when they differ from what this makes, and
``python -m meterage._tables --write`` rewrites them.

>>> from meterage._tables import table
>>> table("what is measured").splitlines()[0]
'| snapshot key | unit | probe | source |'
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from meterage import _native

if TYPE_CHECKING:
    from meterage._native import MeasureInfo

_KiB = 1024


def _groups(key: Callable[[MeasureInfo], object]) -> Iterator[list[MeasureInfo]]:
    """The duration and every probe's measures, those with the same key together (in the
    order of their first)."""
    groups: dict[object, list[MeasureInfo]] = {}
    for measure in [_native.DURATION_MEASURE] + [
        measure for probe in _native.PROBES for measure in probe["measures"]
    ]:
        groups.setdefault(key(measure), []).append(measure)
    yield from groups.values()


def _probe_label(probe: str) -> str:
    if not probe:
        return "always"
    (info,) = [p for p in _native.PROBES if p["name"] == probe]
    return f"`{probe}`" if info["default"] else f"`{probe}` (opt-in)"


def _number(value: float, unit: str) -> str:
    if unit == "By" and value >= _KiB and math.log2(value).is_integer():
        power = int(math.log2(value))
        return f"{2 ** (power % 10)} {('KiB', 'MiB', 'GiB', 'TiB')[power // 10 - 1]}"
    return f"{value:g}".replace("e-0", "e-").replace("e+0", "e")


def _what_is_measured() -> list[list[str]]:
    rows = [["snapshot key", "unit", "probe", "source"]]
    for group in _groups(lambda m: (m["probe"], m["unit"], m["source"])):
        first = group[0]
        rows.append(
            [
                ", ".join(f"`{m['key']}`" for m in group),
                first["unit"],
                _probe_label(first["probe"]),
                first["source"],
            ]
        )
    return rows


#: What meterage.otel adds to a probe measure's metric name for the counter of its
#: estimated total (``meterage.otel._names.ESTIMATED_SUFFIX``; a test holds them equal).
_ESTIMATED_SUFFIX = ".estimated"


def _exported_metrics() -> list[list[str]]:
    rows = [
        [
            "snapshot keys",
            "OpenTelemetry metric",
            "unit",
            "extra attribute",
            "boundaries",
            "estimated total (counter)",
        ]
    ]
    for group in _groups(lambda m: m["metric"]):
        first = group[0]
        attributes = "—"
        if first["attributes"]:
            names = [name for name, _ in first["attributes"]]
            values = [" / ".join(value for _, value in m["attributes"]) for m in group]
            attributes = f"`{' / '.join(names)}` = {' / '.join(values)}"
        rows.append(
            [
                " / ".join(f"`{m['key']}`" for m in group),
                f"`{first['metric']}`",
                first["unit"],
                attributes,
                ", ".join(_number(b, first["unit"]) for b in first["boundaries"]),
                "—" if first["probe"] == "" else f"`{first['metric']}{_ESTIMATED_SUFFIX}`",
            ]
        )
    return rows


#: The unit of each boundary set of ``_native.BOUNDARIES`` and what it is for (a new set
#: needs a line here: the docs' table is made from these).
BOUNDARY_SETS: dict[str, tuple[str, str]] = {
    "duration": ("s", "durations: the HTTP semantic conventions' (`meterage.call.duration`)"),
    "cpu.time": ("s", "CPU time, from a microsecond (`meterage.call.cpu.time`)"),
    "queue.wait": ("s", "waits, from a millisecond to an hour (`job.queue.wait`)"),
    "bytes": ("By", "sizes (`meterage.call.io`, request, response and job output sizes)"),
    "events": ("{event}", "events per call (`meterage.call.paging.faults`, context switches)"),
    "allocations": ("{allocation}", "large counts (`meterage.call.memory.allocations`)"),
    "energy": ("J", "energy (`meterage.call.gpu.energy`)"),
    "gpu.memory": ("By", "large sizes (`meterage.call.gpu.memory`)"),
    "default": ("", "the OpenTelemetry SDK's default, which `boundaries=None` exports"),
}


def _boundary_sets() -> list[list[str]]:
    rows = [["name", "unit", "boundaries", "for"]]
    for name, values in _native.BOUNDARIES.items():
        unit, use = BOUNDARY_SETS[name]
        numbers = ", ".join(_number(value, unit) for value in values)
        rows.append([f'`"{name}"`', unit or "any", numbers, use])
    return rows


TABLES: dict[str, Callable[[], list[list[str]]]] = {
    "what is measured": _what_is_measured,
    "exported metrics": _exported_metrics,
    "boundary sets": _boundary_sets,
}
#: Which file holds which table.
PLACES = {
    "README.md": "what is measured",
    "docs/otel.md": "exported metrics",
    "docs/api.md": "boundary sets",
}


def table(name: str) -> str:
    """The Markdown table ``name`` (one of ``TABLES``)."""
    rows = TABLES[name]()
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows[1:]]
    return "\n".join(lines)


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- measures: {re.escape(name)} -->\n)(.*?)(\n<!-- end measures -->)", re.S
    )


def current(text: str, name: str) -> str | None:
    """The table ``name`` as ``text`` holds it between its markers (None: no markers)."""
    found = _pattern(name).search(text)
    return found.group(2) if found else None


def rewrite(text: str, name: str) -> str:
    """``text`` with the table ``name`` between its markers made afresh."""
    return _pattern(name).sub(lambda m: m.group(1) + table(name) + m.group(3), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meterage._tables", description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite the tables in place")
    parser.add_argument("root", nargs="?", default=".", help="the repository (default: .)")
    options = parser.parse_args(argv)
    stale = []
    for relative, name in PLACES.items():
        path = Path(options.root) / relative
        text = path.read_text(encoding="utf-8")
        if current(text, name) != table(name):
            stale.append(relative)
            if options.write:
                path.write_text(rewrite(text, name), encoding="utf-8")
    if stale and not options.write:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
