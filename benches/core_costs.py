"""The core's costs next to their goals: blocks, instruments, meters, series, fork.

    python benches/core_costs.py             # ~1 min; prints the table in docs/benchmarks.md
    python benches/core_costs.py --quick     # fewer rounds and series, for a smoke run

Per-operation costs are measured the way ``python -m meterage bench`` measures overhead
(``meterage.cli.overhead``): each statement unrolled in a loop, interleaved shuffled rounds,
the median over rounds of its time minus its baseline's in the same round. Series, snapshot,
memory and fork figures are measured directly: the time of a batch of new series when the
map already holds n, a snapshot of n series divided by n, the native bytes per series, and a
fork whose child starts empty, reads a snapshot and records a call before it reports back.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import meterage
from meterage import _native
from meterage.cli import overhead


@dataclass
class Figure:
    what: str
    value: float
    unit: str
    goal: str
    passed: bool | None = None

    def row(self) -> str:
        mark = {True: "yes", False: "**no**", None: ""}[self.passed]
        return f"| {self.what} | {self.value:,.1f} {self.unit} | {self.goal} | {mark} |"


def work(x: object) -> object:
    return x


def per_operation_subjects() -> list[overhead.Subject]:
    """The statements timed per operation, each with the baseline it is compared with."""
    Subject = overhead.Subject
    block = meterage.meter("bench.core.block", probes=())
    decorated = meterage.meter("bench.core.decorated", probes=())(work)
    histogram = meterage.histogram("bench.core.histogram")
    three = {"model": "small", "route": "/v1/chat", "cached": False}
    ten = {f"key{index}": f"value{index}" for index in range(10)}
    counter = meterage.counter("bench.core.counter")
    bound_histogram = histogram.bind(three)
    bound_counter = counter.bind(three)
    histogram.record(1.0, attributes=three)
    histogram.record(1.0, attributes=ten)
    nothing = "nothing"
    return [
        Subject("bare", "bare call `work(1)`", "calls", "work(1)", {"work": work}),
        Subject(
            "decorated",
            "`@meterage.meter(probes=())` call",
            "calls",
            "f(1)",
            {"f": decorated},
            baseline="bare",
        ),
        Subject(
            "with",
            "`with meter: work(1)`, timer only",
            "calls",
            "with m:\n    work(1)",
            {"m": block, "work": work},
            baseline="bare",
        ),
        Subject(nothing, "an empty statement", "instruments", "pass", {}),
        Subject(
            "record",
            "`h.record(1.0)`",
            "instruments",
            "h.record(1.0)",
            {"h": histogram},
            baseline=nothing,
        ),
        Subject(
            "record3",
            "`h.record(1.0, attributes=<3 attributes>)`",
            "instruments",
            "h.record(1.0, attributes=d)",
            {"h": histogram, "d": three},
            baseline=nothing,
        ),
        Subject(
            "record10",
            "`h.record(1.0, attributes=<10 attributes>)`",
            "instruments",
            "h.record(1.0, attributes=d)",
            {"h": histogram, "d": ten},
            baseline=nothing,
        ),
        Subject(
            "bound.record",
            "`h.bind(<3 attributes>).record(1.0)`",
            "instruments",
            "b.record(1.0)",
            {"b": bound_histogram},
            baseline=nothing,
        ),
        Subject(
            "bound.add",
            "`c.bind(<3 attributes>).add()`",
            "instruments",
            "b.add()",
            {"b": bound_counter},
            baseline=nothing,
        ),
        Subject(
            "meter",
            '`meterage.meter("db.query")`, an existing operation',
            "meters",
            'meter("bench.core.inline")',
            {"meter": meterage.meter},
            baseline=nothing,
        ),
        Subject(
            "Meter",
            '`meterage.Meter("db.query", probes=("cpu",))`, an existing operation',
            "meters",
            'Meter("bench.core.inline", probes=probes)',
            {"Meter": meterage.Meter, "probes": ("cpu",)},
            baseline=nothing,
        ),
        Subject(
            "inline",
            '`with meterage.meter("db.query"): work(1)`',
            "meters",
            'with meter("bench.core.inline", probes=()):\n    work(1)',
            {"meter": meterage.meter, "work": work},
            baseline="bare",
        ),
    ]


PER_OPERATION_GOALS: dict[str, tuple[str, float | None]] = {
    "decorated": ("", None),
    "with": ("≤ 150 ns", 150.0),
    "record": ("", None),
    "record3": ("≤ 150 ns", 150.0),
    "record10": ("", None),
    "bound.record": ("≤ 60 ns", 60.0),
    "bound.add": ("≤ 60 ns", 60.0),
    "meter": ("≤ 1 µs", 1000.0),
    "Meter": ("≤ 1 µs", 1000.0),
    "inline": ("", None),
}


def per_operation(rounds: int) -> list[Figure]:
    subjects = per_operation_subjects()
    results = overhead.measure(subjects, rounds=rounds, batch_ms=2.0)
    figures = []
    for subject in subjects:
        if subject.key not in PER_OPERATION_GOALS:
            continue
        goal, limit = PER_OPERATION_GOALS[subject.key]
        value = results.overhead(subject.key)
        figures.append(
            Figure(subject.label, value, "ns", goal, None if limit is None else value <= limit)
        )
    return figures


def _series_batch(histogram: _native.Histogram, first: int, count: int) -> float:
    """Seconds for `count` new series, ids `first`..."""
    started = time.perf_counter()
    for index in range(first, first + count):
        histogram.record(1.0, {"id": index})
    return time.perf_counter() - started


def series_creation(sizes: list[int], batch: int = 2000) -> list[Figure]:
    figures = []
    meterage.configure(cardinality_limit=meterage.MAX_CARDINALITY_LIMIT)
    try:
        for size in sizes:
            meterage.reset()
            histogram = meterage.histogram(f"bench.core.series.{size}")
            _series_batch(histogram, 0, size)  # the map holds `size` series
            per_series = statistics.median(
                _series_batch(histogram, size + k * batch, batch) / batch for k in range(3)
            )
            # What recording into existing series of the same shape costs, taken out.
            existing = statistics.median(
                _series_batch(histogram, 0, batch) / batch for _ in range(3)
            )
            value = (per_series - existing) * 1e6
            figures.append(
                Figure(f"a new series, at {size:,} series", value, "µs", "≤ 5 µs", value <= 5)
            )
    finally:
        meterage.reset()
        meterage.configure(cardinality_limit=2000)
    return figures


def snapshot_and_memory(count: int) -> list[Figure]:
    figures = []
    meterage.configure(cardinality_limit=meterage.MAX_CARDINALITY_LIMIT)
    try:
        for label, probes in (("timer-only", ()), ("all probes", overhead.ALL_PROBES)):
            meterage.reset()
            before = _native.memory_bytes()
            block = meterage.meter(f"bench.core.memory.{len(probes)}", probes=probes, sample=1.0)
            for index in range(count):
                for _ in range(20):  # a typical spread: 20 calls of the same small block
                    with block as call:
                        call.set_attribute("id", index)
            per_series = (_native.memory_bytes() - before) / count
            limit = 2048 if not probes else None
            figures.append(
                Figure(
                    f"memory per {label} series (20 calls)",
                    per_series,
                    "B",
                    "≤ 2 KiB" if limit else "",
                    None if limit is None else per_series <= limit,
                )
            )
            times = []
            for _ in range(5):
                gc.collect()
                started = time.perf_counter()
                series = meterage.snapshot()
                times.append((time.perf_counter() - started) / len(series))
                del series  # freed outside the timed part
            value = statistics.median(times) * 1e6
            figures.append(
                Figure(
                    f"`snapshot()` per {label} series ({count:,} series)",
                    value,
                    "µs",
                    "≤ 2 µs",
                    value <= 2,
                )
            )
    finally:
        meterage.reset()
        meterage.configure(cardinality_limit=2000)
    return figures


def _private_kib() -> int:
    """Memory this process has written since it was forked (or ever): not shared."""
    with open("/proc/self/smaps_rollup") as rollup:
        return sum(int(line.split()[1]) for line in rollup if line.startswith("Private_Dirty:"))


def _fork_once(child: Callable[[], None]) -> tuple[float, int]:
    """Seconds from fork to the child's report, and the child's private memory (KiB)."""
    read, write = os.pipe()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            child()
            os.write(write, str(_private_kib()).encode())
        finally:
            os._exit(0)
    os.close(write)
    report = b""
    while chunk := os.read(read, 64):
        report += chunk
    elapsed = time.perf_counter() - started
    os.close(read)
    os.waitpid(pid, 0)
    return elapsed, int(report or 0)


def fork_cost(count: int) -> list[Figure]:
    """A child that exits at once (the kernel's cost: it grows with the process's memory),
    and one that starts as a pre-fork worker does (its snapshot, a call of its own)."""
    probe = meterage.meter("bench.core.fork.child", probes=(), sample=1.0)

    def nothing() -> None:
        pass

    def worker() -> None:
        # A pre-fork worker's start: a call of its own (its snapshot, which reads every
        # series, is timed apart from the fork: it is a collection, not the fork).
        with probe:
            pass

    def reader() -> None:
        assert not [s for s in meterage.snapshot() if s.operation.startswith("bench.core.fork")]
        with probe:
            pass

    def times(child: Callable[[], None]) -> tuple[float, float]:
        runs = [_fork_once(child) for _ in range(7)]
        return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)

    meterage.reset()
    bare_exit, _ = times(nothing)
    bare_worker, _ = times(worker)
    _, bare_private = times(reader)
    meterage.configure(cardinality_limit=meterage.MAX_CARDINALITY_LIMIT)
    try:
        block = meterage.meter("bench.core.fork.series", probes=overhead.ALL_PROBES, sample=1.0)
        for index in range(count):
            with block as call:
                call.set_attribute("id", index)
        held = _native.memory_bytes() / 2**20
        loaded_exit, _ = times(nothing)
        loaded_worker, _ = times(worker)
        _, loaded_private = times(reader)
    finally:
        meterage.reset()
        meterage.configure(cardinality_limit=2000)
    extra = (loaded_worker - loaded_exit) - (bare_worker - bare_exit)
    private = (loaded_private - bare_private) / 1024
    return [
        Figure("fork, child exits at once: no series", bare_exit * 1e3, "ms", ""),
        Figure(
            f"fork, child exits at once: {count:,} all-probe series ({held:.0f} MiB)",
            loaded_exit * 1e3,
            "ms",
            "(the kernel's page tables)",
        ),
        Figure(
            f"fork, child's first call: {count:,} series",
            loaded_worker * 1e3,
            "ms",
            "",
        ),
        Figure(
            "what meterage adds to a child's start, with those series",
            extra * 1e3,
            "ms",
            "O(1) in series",
            extra < 0.002,
        ),
        Figure(
            "what a child that took a snapshot wrote more than with no series",
            private,
            "MiB",
            f"≪ the {held:.0f} MiB of series",
            private < held / 10,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and series")
    options = parser.parse_args(argv)
    quick = options.quick
    figures = per_operation(rounds=40 if quick else 300)
    sizes = [1_000, 10_000] if quick else [1_000, 10_000, 100_000]
    figures += series_creation(sizes)
    figures += snapshot_and_memory(2_000 if quick else 10_000)
    figures += fork_cost(2_000 if quick else 20_000)
    print(overhead.machine_line())
    print()
    print("| what | measured | goal | met |")
    print("|---|---:|---|---|")
    for figure in figures:
        print(figure.row())
    return 0


if __name__ == "__main__":
    sys.exit(main())
