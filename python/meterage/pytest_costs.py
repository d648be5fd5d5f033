"""A pytest plugin: what each test costs, saved as a baseline and compared with it.

Inactive (nothing measured, no hook of its own registered) unless one of its options is
given:

* ``--meterage-report``: measures each test's call phase on its thread (CPU, IO bytes,
  allocations, faults, context switches: the probes available here) and prints a table.
* ``--meterage-baseline FILE``: writes the costs of the tests that passed to FILE (JSON,
  sorted, indented: it diffs well in a repository).
* ``--meterage-compare FILE``: fails a test whose deterministic costs rose past the
  tolerance against FILE (``--meterage-tolerance``, default 5%, for IO bytes,
  allocations and faults; ``--meterage-cpu-tolerance``, default 50%, for CPU time).

>>> from meterage.pytest_costs import parse_tolerance
>>> parse_tolerance("--meterage-tolerance", "5%"), parse_tolerance("--meterage-tolerance", "0.1")
(0.05, 0.1)
"""

from __future__ import annotations

import json
import math
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any

import pytest

from meterage import _native
from meterage.budget import _BY_KEY, _Measurement, format_value, parse_limit

#: Measures in a baseline, by snapshot key: (probe, gated by default, absolute slack).
#: A gated measure fails a test when now > baseline * (1 + tolerance) + slack. The slacks
#: come from measurement: a five-test suite (fixed IO, allocations, CPU) run 24 times in
#: fresh processes on the 2-core development machine, 12 of them four at a time. IO bytes,
#: allocations and allocated bytes did not vary at all. Minor faults varied by up to 10
#: (190-200), and depend on the heap that earlier tests left (one test's went from 0 to 32
#: when an earlier test allocated more); major faults were always 0. The thread CPU of a
#: test using 0.1-0.3 ms varied by up to 0.31 ms (one of 5 ms by 4%); but the main
#: thread of a test that runs threads waits for the GIL, which costs it CPU: such tests in
#: tests/test_alloc.py went from 0.75 to 3.4 ms and from 6.0 to 10.2 ms, so the CPU slack
#: (``--meterage-cpu-slack``) is 5 ms by default. Context switches depend on the scheduler
#: (0-7 for the same test): reported, never gated.
MEASURED: Mapping[str, tuple[str, bool, float]] = {
    "cpu.time": ("cpu", True, 0.005),
    "io.read": ("io", True, 0),
    "io.write": ("io", True, 0),
    "memory.allocations": ("alloc", True, 50),
    "memory.allocated": ("alloc", True, 8192),
    "paging.faults.minor": ("rusage", True, 64),
    "paging.faults.major": ("rusage", True, 8),
    "context_switches.voluntary": ("rusage", False, 0),
    "context_switches.involuntary": ("rusage", False, 0),
}
SHORT = {
    "cpu.time": "cpu",
    "io.read": "io read",
    "io.write": "io write",
    "memory.allocations": "allocs",
    "memory.allocated": "allocated",
    "paging.faults.minor": "faults min",
    "paging.faults.major": "faults maj",
    "context_switches.voluntary": "cs vol",
    "context_switches.involuntary": "cs invol",
}
FORMAT = 1
_KEY = pytest.StashKey[dict[str, float]]()


def parse_tolerance(option: str, text: str) -> float:
    """A tolerance as a fraction: "5%" or "0.05"; not negative."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise pytest.UsageError(
            f"{option} must be a percentage such as 5% or a fraction such as 0.05, got {text!r}"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise pytest.UsageError(f"{option} must be a finite, non-negative tolerance, got {text!r}")
    return round(value, 12)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("meterage", "meterage: per-test costs")
    group.addoption(
        "--meterage-report",
        action="store_true",
        help="measure each test's call phase and print a table of costs",
    )
    group.addoption(
        "--meterage-baseline",
        metavar="FILE",
        help="save the per-test costs of the tests that passed to FILE (JSON)",
    )
    group.addoption(
        "--meterage-compare",
        metavar="FILE",
        help="fail tests whose costs rose past the tolerances against the baseline FILE",
    )
    group.addoption(
        "--meterage-tolerance",
        default="5%",
        metavar="X",
        help="relative rise allowed for IO bytes, allocations and faults (default 5%%)",
    )
    group.addoption(
        "--meterage-cpu-tolerance",
        default="50%",
        metavar="Y",
        help="relative rise allowed for CPU time (default 50%%)",
    )
    group.addoption(
        "--meterage-cpu-slack",
        default="5ms",
        metavar="TIME",
        help="CPU time a test may rise by on top of --meterage-cpu-tolerance (default 5ms)",
    )


#: ``@pytest.mark.meterage_costs(gate=False)``: the test's costs are measured and reported,
#: never failed (a test whose reads depend on another process's timing: pipe chunks).
MARKER = "meterage_costs"


def _gated(item: pytest.Item) -> bool:
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return True
    gate = marker.kwargs.get("gate", True)
    if not isinstance(gate, bool) or marker.args or set(marker.kwargs) - {"gate"}:
        raise pytest.UsageError(
            f"{item.nodeid}: @pytest.mark.{MARKER} takes only gate=True or gate=False, got "
            f"args {marker.args!r} and keywords {marker.kwargs!r}"
        )
    return gate


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(gate=False): measure and report this test's costs, but never fail it "
        "against a --meterage-compare baseline",
    )
    report = config.getoption("--meterage-report", False)
    baseline = config.getoption("--meterage-baseline", None)
    compare = config.getoption("--meterage-compare", None)
    if not (report or baseline or compare):
        return
    tolerance = parse_tolerance("--meterage-tolerance", config.getoption("--meterage-tolerance"))
    cpu_tolerance = parse_tolerance(
        "--meterage-cpu-tolerance", config.getoption("--meterage-cpu-tolerance")
    )
    try:
        cpu_slack = parse_limit("cpu", config.getoption("--meterage-cpu-slack")) / 1e9
    except ValueError as error:
        raise pytest.UsageError(f"--meterage-cpu-slack: {error}") from None
    expected = None
    if compare:
        expected = load_baseline(Path(compare))
    config.pluginmanager.register(
        Costs(
            report=bool(report),
            baseline=Path(baseline) if baseline else None,
            compare=Path(compare) if compare else None,
            expected=expected,
            tolerance=tolerance,
            cpu_tolerance=cpu_tolerance,
            cpu_slack=cpu_slack,
            writer=not hasattr(config, "workerinput"),
        ),
        "meterage-costs",
    )


def load_baseline(path: Path) -> dict[str, dict[str, float]]:
    """The per-test costs a ``--meterage-baseline`` run saved in ``path``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise pytest.UsageError(f"--meterage-compare: cannot read {path}: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise pytest.UsageError(
            f"--meterage-compare: {path} is not a meterage baseline (format {FORMAT})"
        )
    tests: dict[str, dict[str, float]] = data["tests"]
    return tests


def _probes() -> tuple[str, ...]:
    wanted = sorted({probe for probe, _, _ in MEASURED.values()})
    available = _native.available_probes(wanted)
    return tuple(name for name in wanted if available[name] is None)


class Costs:
    """The plugin's state for one session (registered only when an option asks for it)."""

    def __init__(
        self,
        *,
        report: bool,
        baseline: Path | None,
        compare: Path | None,
        expected: dict[str, dict[str, float]] | None,
        tolerance: float,
        cpu_tolerance: float,
        cpu_slack: float = MEASURED["cpu.time"][2],
        writer: bool,
    ) -> None:
        self.report = report
        self.baseline = baseline
        self.compare = compare
        self.expected = expected
        self.tolerance = tolerance
        self.cpu_tolerance = cpu_tolerance
        self.cpu_slack = cpu_slack
        self.writer = writer
        self.probes = _probes()
        self.costs: dict[str, dict[str, float]] = {}
        self.passed: set[str] = set()
        self.regressed: dict[str, list[tuple[str, float, float]]] = {}

    # Innermost around the test function: other plugins' wrappers are not charged to it.
    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, object, object]:
        measurement = _Measurement(self.probes)
        measurement.start()
        try:
            return (yield)
        finally:
            # Ended as a success even when the test failed: its costs are read all the same.
            measurement.stop()
            values = measurement.values()
            if values is not None:
                item.stash[_KEY] = {
                    key: (value / 1e9 if key == "cpu.time" else value)
                    for key, value in values.items()
                    if key in MEASURED
                }

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if report.when != "call" or _KEY not in item.stash:
            return report
        costs = item.stash[_KEY]
        report.meterage_costs = costs  # type: ignore[attr-defined]
        if self.expected is not None and report.passed and not hasattr(report, "wasxfail"):
            before = self.expected.get(item.nodeid)
            if before is not None and _gated(item):
                rises = self.rises(before, costs)
                if rises:
                    report.outcome = "failed"
                    report.longrepr = (
                        f"meterage: costs rose past the tolerance against {self.compare}\n"
                        + _diff_table([(item.nodeid, *rise) for rise in rises])
                    )
        return report

    def rises(
        self, before: Mapping[str, float], now: Mapping[str, float]
    ) -> list[tuple[str, float, float]]:
        """The gated measures that rose past their tolerance: (key, baseline, now)."""
        found = []
        for key, (_, gated, slack) in MEASURED.items():
            if not gated or key not in before or key not in now:
                continue
            if key == "cpu.time":
                tolerance, slack = self.cpu_tolerance, self.cpu_slack
            else:
                tolerance = self.tolerance
            if now[key] > before[key] * (1 + tolerance) + slack:
                found.append((key, before[key], now[key]))
        return found

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        costs = getattr(report, "meterage_costs", None)
        if report.when != "call" or costs is None:
            return
        self.costs[report.nodeid] = dict(costs)
        if report.passed:
            self.passed.add(report.nodeid)
        elif isinstance(report.longrepr, str) and report.longrepr.startswith("meterage:"):
            self.regressed[report.nodeid] = []

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.baseline is None or not self.writer:
            return
        tests = {
            nodeid: {
                key: (round(value, 6) if key == "cpu.time" else int(value))
                for key, value in sorted(costs.items())
            }
            for nodeid, costs in sorted(self.costs.items())
            if nodeid in self.passed
        }
        units = {key: _native_unit(key) for key in MEASURED}
        text = json.dumps(
            {"format": FORMAT, "units": units, "tests": tests}, indent=2, sort_keys=True
        )
        self.baseline.write_text(text + "\n", encoding="utf-8")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        write = terminalreporter.write_line
        if self.report:
            terminalreporter.section("meterage: per-test costs (call phase, its thread)")
            for line in _cost_table(self.costs).splitlines():
                write(line)
        if self.expected is not None:
            terminalreporter.section(f"meterage: compared with {self.compare}")
            diffs = []
            for nodeid, costs in self.costs.items():
                if nodeid not in self.passed and nodeid not in self.regressed:
                    continue  # failed on its own: not compared
                before = self.expected.get(nodeid)
                if before is not None:
                    diffs += [(nodeid, *rise) for rise in self.rises(before, costs)]
            if diffs:
                write(f"{len({d[0] for d in diffs})} test(s) cost more than the baseline:")
                for line in _diff_table(diffs).splitlines():
                    write(line)
            else:
                write("no test costs more than the baseline allows")
            if self.regressed:
                # Only these failed for their costs (a test marked gate=False is listed
                # above, never failed).
                write(f"meterage: {len(self.regressed)} test(s) failed for their costs")
            new = sorted(set(self.costs) - set(self.expected))
            missing = sorted(set(self.expected) - set(self.costs))
            if new:
                write(f"not in the baseline (not compared): {', '.join(new)}")
            if missing:
                write(f"in the baseline but not run: {', '.join(missing)}")
        if self.baseline is not None and self.writer:
            write(f"meterage: baseline of {len(self.passed)} test(s) written to {self.baseline}")


def _native_unit(key: str) -> str:
    return {"time": "s", "bytes": "By"}.get(_BY_KEY[key].kind, "1")


def _show(key: str, value: float) -> str:
    if key == "cpu.time":
        return format_value(key, value * 1e9)
    if _BY_KEY[key].kind == "bytes":
        return format_value(key, value).split(" (")[0]
    return f"{value:.0f}"


def _columns(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _cost_table(costs: Mapping[str, Mapping[str, float]]) -> str:
    keys = [key for key in MEASURED if any(key in c for c in costs.values())]
    rows = [["test", *(SHORT[key] for key in keys)]]
    for nodeid, values in costs.items():
        rows.append([nodeid, *(_show(k, values[k]) if k in values else "-" for k in keys)])
    return _columns(rows)


def _diff_table(diffs: list[tuple[str, str, float, float]]) -> str:
    rows = [["test", "measure", "baseline", "now", "change"]]
    for nodeid, key, before, now in diffs:
        change = f"+{(now - before) / before:.0%}" if before else "from 0"
        rows.append([nodeid, key, _show(key, before), _show(key, now), change])
    return _columns(rows)
