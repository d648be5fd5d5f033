"""``python -m meterage demo``: a synthetic workload, metered, and what each call cost.

The workload is defined by :data:`OPERATIONS` and :func:`plan`: how many calls each
operation gets follows from ``--duration`` alone, so runs are comparable and tests can
predict the counts. The overhead figures are measured in the same process, on empty
stand-ins, right after the workload.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import textwrap
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import meterage
from meterage.cli.table import (
    format_amount,
    format_bytes,
    format_seconds,
    format_share,
    render,
)

if TYPE_CHECKING:
    from meterage._native import MeasureInfo

DESCRIPTION = (
    "Run a built-in synthetic workload (CPU-bound, file IO, sleeping, asyncio, failing, "
    "generator, with-block and memory-hungry operations) under meterage, then print what "
    "each call cost and what metering itself cost on this machine."
)
DEFAULT_DURATION = 4.0

# Stand-in sizes shared by the workload and its descriptions.
CPU_ITERATIONS = 20_000
FILE_BYTES = 64 * 1024
SLEEP_SECONDS = 0.004
ASYNC_CONCURRENCY = 8
ASYNC_WAIT_SECONDS = 0.005
GENERATOR_ROWS = 16
REPORT_LINES = 2_000
RECORDS_PER_FILL = 200
CACHED_FILLS = 32
# The failing operation raises these on about this share of its calls each.
ERROR_SHARES: tuple[tuple[type[Exception], float], ...] = ((ValueError, 0.12), (TimeoutError, 0.04))
ADAPTIVE_OPERATION = "demo.lookup"


@dataclass(frozen=True)
class Operation:
    """One operation of the workload and how it is metered."""

    name: str
    what: str
    # Share of --duration the operation is meant to take, and its expected wall time per
    # call on a small machine: together they fix the call count (see plan()).
    share: float
    seconds_per_call: float
    # How the call is metered, to pick the matching overhead measurement: a decorated
    # function, a with block, or a generator/coroutine metered once per resumption.
    style: str = "function"
    steps_per_call: int = 1
    calls_multiple_of: int = 1


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "demo.cpu_bound",
        f"pure-Python loop, {CPU_ITERATIONS:,} iterations",
        share=0.25,
        seconds_per_call=0.001,
    ),
    Operation(
        "demo.file_io",
        f"write {FILE_BYTES // 1024} KiB to a temp file, fsync, read it back",
        share=0.15,
        seconds_per_call=0.0015,  # mostly fsync: 0.3-5 ms depending on the storage
    ),
    Operation(
        "demo.sleep",
        f"time.sleep({SLEEP_SECONDS * 1e3:g} ms): waiting, not working",
        share=0.12,
        seconds_per_call=SLEEP_SECONDS + 0.0001,
    ),
    Operation(
        "demo.async_fetch",
        f"async def, {ASYNC_CONCURRENCY} concurrent tasks, each awaits asyncio.sleep twice",
        share=0.15,
        seconds_per_call=(2 * ASYNC_WAIT_SECONDS + 0.001) / ASYNC_CONCURRENCY,
        style="steps",
        steps_per_call=3,  # started, resumed after each of the two sleeps
        calls_multiple_of=ASYNC_CONCURRENCY,
    ),
    Operation(
        "demo.flaky",
        "small parse that raises ValueError or TimeoutError on some calls",
        share=0.05,
        seconds_per_call=0.0001,
    ),
    Operation(
        "demo.generator",
        f"generator yielding {GENERATOR_ROWS} rows, consumed to the end",
        share=0.08,
        seconds_per_call=0.0004,
        style="steps",
        steps_per_call=GENERATOR_ROWS + 1,
    ),
    Operation(
        "demo.batch",
        "with-block; sets the dynamic attribute batch.size; feeds custom instruments",
        share=0.05,
        seconds_per_call=0.00006,
        style="with",
    ),
    Operation(
        "demo.render",
        f"join a {REPORT_LINES:,}-line report built as a list of strings (keeps nothing)",
        share=0.06,
        seconds_per_call=0.0006,
    ),
    Operation(
        "demo.cache_fill",
        f"parse {RECORDS_PER_FILL} records into a cache of the last {CACHED_FILLS} fills "
        "(keeps them)",
        share=0.06,
        seconds_per_call=0.0003,
    ),
    Operation(
        ADAPTIVE_OPERATION,
        "tiny dict lookup, default adaptive sampling budget",
        share=0.03,
        seconds_per_call=0.00000025,
    ),
)


def plan(duration: float) -> dict[str, int]:
    """Calls per operation for a workload scaled to about ``duration`` seconds."""
    calls = {}
    for operation in OPERATIONS:
        multiple = operation.calls_multiple_of
        units = round(duration * operation.share / (operation.seconds_per_call * multiple))
        calls[operation.name] = max(1, units) * multiple
    return calls


# ---- the workload ----------------------------------------------------------------------


def _checksum(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total = (total + i * i) % 1_000_003
    return total


@dataclass
class DriverReport:
    """What the driver did, counted on its side (to compare with what meterage saw)."""

    calls: Counter[str] = field(default_factory=Counter)
    errors: dict[str, Counter[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def workload_probes(available: dict[str, str | None] | None = None) -> tuple[str, ...]:
    """Every probe that works here (``available``: as ``meterage.available_probes()``
    says): the OS ones, memory, and the GPU's when NVML works."""
    if available is None:
        available = meterage.available_probes()
    return tuple(name for name, why in available.items() if why is None)


class Workload:
    """The metered operations; built fresh for each run so meters start empty."""

    def __init__(self, directory: str, probes: tuple[str, ...] = ("cpu", "rusage", "io")) -> None:
        sample = 1.0  # every call runs the probes, except the adaptive operation
        self.path = os.path.join(directory, "demo.bin")
        self.payload = os.urandom(FILE_BYTES)
        self.cache: dict[int, int] = {}
        self.table = {key: key * key for key in range(1024)}

        self.cpu_bound = meterage.meter("demo.cpu_bound", probes=probes, sample=sample)(_checksum)
        self.file_io = meterage.meter("demo.file_io", probes=probes, sample=sample)(self._file_io)
        self.sleep = meterage.meter("demo.sleep", probes=probes, sample=sample)(time.sleep)
        self.fetch = meterage.meter("demo.async_fetch", probes=probes, sample=sample)(self._fetch)
        self.flaky = meterage.meter("demo.flaky", probes=probes, sample=sample)(self._parse)
        self.rows = meterage.meter("demo.generator", probes=probes, sample=sample)(self._rows)
        self.batch = meterage.meter("demo.batch", probes=probes, sample=sample)
        self.render = meterage.meter("demo.render", probes=probes, sample=sample)(self._render)
        self.cache_fill = meterage.meter("demo.cache_fill", probes=probes, sample=sample)(
            self._cache_fill
        )
        self.cached: deque[dict[int, dict[str, Any]]] = deque(maxlen=CACHED_FILLS)
        self.lookup = meterage.meter(ADAPTIVE_OPERATION, probes=probes)(self.table.get)
        self.batch_items = meterage.histogram(
            "demo.batch.items", unit="{item}", description="items per batch"
        )
        self.cache_lookups = meterage.counter(
            "demo.cache.lookups", unit="{lookup}", description="cache lookups by result"
        )

    def _file_io(self) -> int:
        with open(self.path, "wb") as file:
            file.write(self.payload)
            file.flush()
            os.fsync(file.fileno())  # so the bytes reach storage: disk.io.write
        with open(self.path, "rb") as file:
            return len(file.read())

    async def _fetch(self, request: int) -> int:
        await asyncio.sleep(ASYNC_WAIT_SECONDS)
        value = _checksum(500 + request % 7)
        await asyncio.sleep(ASYNC_WAIT_SECONDS)
        return value

    @staticmethod
    def _parse(record: int, fate: float) -> int:
        value = _checksum(1_000 + record % 13)
        # fate is drawn by the driver, so the driver knows which calls fail.
        threshold = 0.0
        for error, share in ERROR_SHARES:
            threshold += share
            if fate < threshold:
                raise error(f"record {record} failed")
        return value

    @staticmethod
    def _render(lines: int) -> int:
        report = [f"line {index:>6}: {index * index:>14,}" for index in range(lines)]
        return len("\n".join(report))

    def _cache_fill(self, fill: int) -> int:
        records = {
            index: {"id": index, "name": f"record-{fill}-{index}", "score": index * 0.5}
            for index in range(RECORDS_PER_FILL)
        }
        self.cached.append(records)  # the oldest fill is dropped: freed, not this call's
        return len(records)

    @staticmethod
    def _rows(count: int) -> Iterator[dict[str, int]]:
        for index in range(count):
            yield {"row": index, "checksum": _checksum(300)}

    def run_batch(self, rng: random.Random) -> None:
        size = int(rng.lognormvariate(4.0, 0.8)) + 1
        label = "small" if size < 64 else "large"
        hits = 0
        with self.batch as call:
            # Known only inside the call: a dynamic attribute, its own series.
            call.set_attribute("batch.size", label)
            for _ in range(size):
                key = rng.randrange(512)
                if key in self.cache:
                    hits += 1
                else:
                    self.cache[key] = _checksum(20)
            if len(self.cache) > 384:
                self.cache.clear()
        self.batch_items.record(size, attributes={"batch.size": label})
        self.cache_lookups.add(hits, attributes={"result": "hit"})
        self.cache_lookups.add(size - hits, attributes={"result": "miss"})


def run_workload(workload: Workload, calls: dict[str, int]) -> DriverReport:
    """Runs every operation its planned number of times, one operation after another."""
    report = DriverReport()
    rng = random.Random(20240601)  # fixed: the same failures and batch sizes every run

    # Each body makes n calls and returns how many it made, counted on the driver's side.
    def cpu_bound(n: int) -> int:
        for _ in range(n):
            workload.cpu_bound(CPU_ITERATIONS)
        return n

    def file_io(n: int) -> int:
        return sum(workload.file_io() == FILE_BYTES for _ in range(n))

    def sleep(n: int) -> int:
        for _ in range(n):
            workload.sleep(SLEEP_SECONDS)
        return n

    def async_fetch(n: int) -> int:
        async def batches() -> int:
            done = 0
            for start in range(0, n, ASYNC_CONCURRENCY):
                tasks = (workload.fetch(start + i) for i in range(ASYNC_CONCURRENCY))
                done += len(await asyncio.gather(*tasks))
            return done

        return asyncio.run(batches())

    def flaky(n: int) -> int:
        errors: Counter[str] = Counter()
        for record in range(n):
            try:
                workload.flaky(record, rng.random())
            except tuple(error for error, _ in ERROR_SHARES) as error:
                # Failures are part of the workload: counted here, recorded by meterage.
                errors[type(error).__qualname__] += 1
        report.errors["demo.flaky"] = errors
        return n

    def generator(n: int) -> int:
        rows = 0
        for _ in range(n):
            for _row in workload.rows(GENERATOR_ROWS):
                rows += 1
        return rows // GENERATOR_ROWS

    def batch(n: int) -> int:
        for _ in range(n):
            workload.run_batch(rng)
        return n

    def render(n: int) -> int:
        return sum(workload.render(REPORT_LINES) > 0 for _ in range(n))

    def cache_fill(n: int) -> int:
        return sum(workload.cache_fill(fill) == RECORDS_PER_FILL for fill in range(n))

    def lookup(n: int) -> int:
        get = workload.lookup
        for key in range(n):
            get(key & 1023)
        return n

    bodies: dict[str, Callable[[int], int]] = {
        "demo.cpu_bound": cpu_bound,
        "demo.file_io": file_io,
        "demo.sleep": sleep,
        "demo.async_fetch": async_fetch,
        "demo.flaky": flaky,
        "demo.generator": generator,
        "demo.batch": batch,
        "demo.render": render,
        "demo.cache_fill": cache_fill,
        ADAPTIVE_OPERATION: lookup,
    }
    for operation in OPERATIONS:
        started = time.perf_counter()
        report.calls[operation.name] = bodies[operation.name](calls[operation.name])
        report.seconds[operation.name] = time.perf_counter() - started
    return report


# ---- overhead, measured on empty stand-ins ---------------------------------------------


def _empty() -> None:
    pass


_STAND_IN_ITEMS = (None,) * 7  # 7 items: a call is 8 resumptions (steps)
_STAND_IN_STEPS = len(_STAND_IN_ITEMS) + 1


def _stand_in_generator() -> Iterator[None]:
    yield from _STAND_IN_ITEMS


@dataclass(frozen=True)
class Overhead:
    """Median per-unit costs of one metering style (a unit is a call, or a step)."""

    style: str
    label: str
    bare_s: float
    timer_only_s: float
    all_probes_s: float
    rounds: int

    @property
    def probes_s(self) -> float:
        """What the probes add over the timer alone."""
        return self.all_probes_s - self.timer_only_s


def _stand_ins(style: str, probe_names: tuple[str, ...]) -> tuple[Callable[[], object], ...]:
    """(bare, timer only, the workload's probes at sample=1.0) for one metering style."""
    name = f"meterage.demo.overhead.{style}"
    timer = meterage.meter(f"{name}.timer_only", probes=())
    probes = meterage.meter(f"{name}.all_probes", probes=probe_names, sample=1.0)
    if style == "function":
        return _empty, timer(_empty), probes(_empty)
    if style == "with":

        def timer_block() -> None:
            with timer:
                pass

        def probes_block() -> None:
            with probes:
                pass

        return _empty, timer_block, probes_block
    if style == "steps":
        metered_timer, metered_probes = timer(_stand_in_generator), probes(_stand_in_generator)

        def bare_generator() -> None:
            for _ in _stand_in_generator():
                pass

        def timer_generator() -> None:
            for _ in metered_timer():
                pass

        def probes_generator() -> None:
            for _ in metered_probes():
                pass

        return bare_generator, timer_generator, probes_generator
    raise ValueError(f"unknown metering style {style!r}")


def _per_call(function: Callable[[], object], calls: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(calls):
        function()
    return (time.perf_counter_ns() - started) / calls / 1e9


def _calls_for(function: Callable[[], object], target_seconds: float) -> int:
    per_call = _per_call(function, 64)
    return max(64, min(2_000_000, int(target_seconds / max(per_call, 1e-9))))


STYLE_LABELS = {
    "function": "decorated function, per call",
    "with": "with block, per call",
    "steps": "generator/coroutine, per step",
}


def measure_overhead(
    rounds: int = 5,
    target_seconds: float = 0.004,
    probes: tuple[str, ...] = ("cpu", "rusage", "io"),
) -> dict[str, Overhead]:
    """Bare vs timer-only vs ``probes``, interleaved in rounds; medians of the differences."""
    stand_ins = {style: _stand_ins(style, probes) for style in STYLE_LABELS}
    calls = {
        style: [_calls_for(function, target_seconds) for function in functions]
        for style, functions in stand_ins.items()
    }
    samples: dict[str, list[tuple[float, float, float]]] = {style: [] for style in stand_ins}
    # Paused so that a collection made due by one variant is not timed in another; the
    # stand-ins allocate little, so nothing piles up meanwhile.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(rounds):
            for style, functions in stand_ins.items():
                # Rotate the order each round so no variant always runs first (warm caches).
                order = [(round_index + k) % 3 for k in range(3)]
                timings = [0.0, 0.0, 0.0]
                for variant in order:
                    timings[variant] = _per_call(functions[variant], calls[style][variant])
                samples[style].append((timings[0], timings[1], timings[2]))
    finally:
        if collecting:
            gc.enable()
    results = {}
    for style, rows in samples.items():
        per_unit = _STAND_IN_STEPS if style == "steps" else 1
        results[style] = Overhead(
            style=style,
            label=STYLE_LABELS[style],
            bare_s=statistics.median(bare for bare, _, _ in rows) / per_unit,
            timer_only_s=statistics.median(timer - bare for bare, timer, _ in rows) / per_unit,
            all_probes_s=statistics.median(probes - bare for bare, _, probes in rows) / per_unit,
            rounds=rounds,
        )
    return results


# ---- turning the snapshot into rows ----------------------------------------------------

# A call's GPU energy is one of these two (see docs/gpu.md): summed per call.
GPU_ENERGY_MEASURES = ("gpu.energy", "gpu.energy.estimated")
#: Probes with a table of their own in the report (the others share "Resources per call").
OWN_SECTIONS = ("cpu", "gpu")


def measure_columns(probe: str) -> list[tuple[str, list[MeasureInfo]]]:
    """One probe's report columns: (header, measures); measures that share an exported
    metric share a column ("io read / write")."""
    (info,) = [p for p in meterage._native.PROBES if p["name"] == probe]
    columns: dict[str, list[MeasureInfo]] = {}
    for measure in info["measures"]:
        columns.setdefault(measure["metric"], []).append(measure)
    out = []
    for metric, measures in columns.items():
        header = metric.removeprefix("meterage.call.").replace(".", " ").replace("_", " ")
        values = [" / ".join(value for _, value in m["attributes"]) for m in measures]
        if any(values):
            header += " " + " / ".join(values)
        out.append((header, measures))
    return out


def merged_quantile(histograms: Sequence[Any], q: float) -> float | None:
    """The q-quantile of several HistogramSnapshots taken together (None if all are empty)."""
    live = [histogram for histogram in histograms if histogram.count]
    if not live:
        return None
    merged = live[0]
    for histogram in live[1:]:
        merged = merged.merge(histogram)
    return float(merged.quantile(q))


def _overhead_per_call(
    operation: Operation, overhead: dict[str, Overhead], probed_share: float
) -> float:
    cost = overhead[operation.style]
    per_unit = cost.timer_only_s + cost.probes_s * probed_share
    return per_unit * (operation.steps_per_call if operation.style == "steps" else 1)


def _estimated_share(series: Sequence[meterage.Series]) -> float | None:
    """Of the probed calls with a GPU energy value, the share that got an estimate."""
    counted = sum(s.histograms["gpu.energy"].count for s in series if "gpu.energy" in s.histograms)
    estimated = sum(
        s.histograms["gpu.energy.estimated"].count
        for s in series
        if "gpu.energy.estimated" in s.histograms
    )
    return estimated / (counted + estimated) if counted + estimated else None


def operation_rows(
    snapshot: Sequence[meterage.Series],
    overhead: dict[str, Overhead],
    driver: DriverReport,
) -> list[dict[str, Any]]:
    """One dict of plain numbers per operation, series of the same operation summed."""
    rows = []
    for operation in OPERATIONS:
        series = [s for s in snapshot if s.kind == "call" and s.operation == operation.name]
        calls = sum(s.count for s in series)
        sampled = sum(s.sampled for s in series)
        errors: Counter[str] = Counter()
        by_attribute: list[dict[str, Any]] = []
        for s in series:
            attributes = s.attributes
            if "error.type" in attributes:
                errors[str(attributes["error.type"])] += s.count
            by_attribute.append({"attributes": attributes, "calls": s.count})
        durations = [s.histograms["duration"] for s in series]
        row: dict[str, Any] = {
            "operation": operation.name,
            "what": operation.what,
            "sampling": "adaptive" if operation.name == ADAPTIVE_OPERATION else "sample=1.0",
            "calls": calls,
            "errors": sum(errors.values()),
            "errors_by_type": dict(errors),
            "probed": sampled,
            "probed_share": sampled / calls if calls else None,
            "latency_p50_s": merged_quantile(durations, 0.5),
            "latency_p99_s": merged_quantile(durations, 0.99),
            "wall_per_call_s": sum(h.sum for h in durations) / calls if calls else None,
        }
        # Every probe measure, per call (probed calls weighted by 1/p): None when not read.
        per_call: dict[str, float | None] = {}
        for probe in meterage._native.PROBES:
            for measure in probe["measures"]:
                key = measure["key"]
                present = [s for s in series if key in s.histograms]
                per_call[key] = (
                    sum(s.estimated_total(key) for s in present) / calls
                    if present and calls
                    else None
                )
        row["per_call"] = per_call
        energy = [(s, m) for s in series for m in GPU_ENERGY_MEASURES if m in s.histograms]
        row["gpu_energy_per_call_j"] = (
            sum(s.estimated_total(m) for s, m in energy) / calls if energy and calls else None
        )
        row["gpu_energy_estimated_share"] = _estimated_share(series)
        row["overhead_per_call_s"] = _overhead_per_call(
            operation, overhead, row["probed_share"] or 0.0
        )
        row["series"] = by_attribute
        row["driver"] = {
            "calls": driver.calls[operation.name],
            "errors": sum(driver.errors.get(operation.name, Counter()).values()),
            "seconds": driver.seconds.get(operation.name),
        }
        rows.append(row)
    return rows


INSTRUMENT_NAMES = ("demo.batch.items", "demo.cache.lookups")


def instrument_rows(snapshot: Sequence[meterage.Series]) -> list[dict[str, Any]]:
    """The demo's custom histogram and counter, one dict per series."""
    rows = []
    for s in snapshot:
        if s.operation not in INSTRUMENT_NAMES:
            continue
        row: dict[str, Any] = {
            "name": s.operation,
            "kind": s.kind,
            "unit": s.unit,
            "attributes": s.attributes,
        }
        if s.kind == "counter":
            row["value"] = s.value
        else:
            histogram = s.histograms[s.operation]
            row.update(
                count=histogram.count,
                sum=histogram.sum,
                mean=histogram.mean,
                p50=histogram.quantile(0.5),
                p99=histogram.quantile(0.99),
                max=histogram.max,
            )
        rows.append(row)
    rows.sort(key=lambda row: (row["name"], sorted(row["attributes"].items())))
    return rows


# ---- output ----------------------------------------------------------------------------


def _pair(first: str, second: str) -> str:
    return f"{first} / {second}"


def _format_time_table(rows: list[dict[str, Any]]) -> str:
    headers = ("operation", "calls", "errors", "probed", "p50", "p99", "cpu/call", "overhead")
    cells = [
        (
            row["operation"],
            f"{row['calls']:,}",
            f"{row['errors']:,}",
            format_share(row["probed_share"]),
            format_seconds(row["latency_p50_s"]),
            format_seconds(row["latency_p99_s"]),
            format_seconds(row["per_call"]["cpu.time"]),
            format_seconds(row["overhead_per_call_s"]),
        )
        for row in rows
    ]
    return render(headers, cells, indent="  ")


def _format_value(value: float | None, unit: str) -> str:
    if unit == "By":
        return format_bytes(value)
    if unit == "s":
        return format_seconds(value)
    return format_amount(value)


def _format_probe_table(rows: list[dict[str, Any]], probe: str) -> str:
    """One probe's measures per call, a column per exported metric."""
    columns = measure_columns(probe)
    headers = ("operation", *(header for header, _ in columns))
    cells = [
        (
            row["operation"],
            *(
                " / ".join(_format_value(row["per_call"][m["key"]], m["unit"]) for m in measures)
                for _, measures in columns
            ),
        )
        for row in rows
    ]
    return render(headers, cells, indent="  ")


def _format_gpu_table(rows: list[dict[str, Any]]) -> str:
    headers = ("operation", "GPU energy/call", "estimated", "GPU memory at end")
    cells = [
        (
            row["operation"],
            "n/a"
            if row["gpu_energy_per_call_j"] is None
            else f"{row['gpu_energy_per_call_j']:.4g} J",
            format_share(row["gpu_energy_estimated_share"]),
            format_bytes(row["per_call"]["gpu.memory"]),
        )
        for row in rows
    ]
    return render(headers, cells, indent="  ")


def _gpu_section(report: dict[str, Any]) -> list[str]:
    """The GPU table when NVML works here, else one line saying why not."""
    reason = report["probes"].get("gpu")
    if reason is not None:
        return [f"GPU columns: none (no usable NVIDIA GPU here: {reason})", ""]
    names = ", ".join(f"{gpu['index']} {gpu['name']}" for gpu in report["gpus"] if gpu["counted"])
    return [
        f"GPU per call (counted GPUs: {names}):",
        "",
        _format_gpu_table(report["operations"]),
        _notes(
            "energy: what the GPUs used during the call (all work on them, not only this "
            "process's); calls under 100 ms get a power x time estimate (their share in "
            "'estimated'), longer ones the energy counter's difference. memory: this "
            "process's GPU memory when the call ended (mean)."
        ),
        "",
    ]


def _format_attributes(attributes: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(attributes.items())) or "-"


def _format_instruments(rows: list[dict[str, Any]]) -> str:
    headers = ("instrument", "kind", "attributes", "count", "total", "mean", "p50", "p99")
    cells = []
    for row in rows:
        unit = row["unit"].strip("{}")
        if row["kind"] == "counter":
            total = f"{row['value']:,.0f} {unit}"
            attributes = _format_attributes(row["attributes"])
            cells.append((row["name"], "counter", attributes, "", total, "", "", ""))
        else:
            cells.append(
                (
                    row["name"],
                    "histogram",
                    _format_attributes(row["attributes"]),
                    f"{row['count']:,}",
                    f"{row['sum']:,.0f} {unit}",
                    format_amount(row["mean"]),
                    format_amount(row["p50"]),
                    format_amount(row["p99"]),
                )
            )
    return render(headers, cells, left=3, indent="  ")


def _format_overhead(overhead: dict[str, Overhead]) -> str:
    headers = ("metering style", "bare", "timer only", "all probes", "probes alone")
    cells = [
        (
            cost.label,
            format_seconds(cost.bare_s),
            format_seconds(cost.timer_only_s, sign=True),
            format_seconds(cost.all_probes_s, sign=True),
            format_seconds(cost.probes_s, sign=True),
        )
        for cost in overhead.values()
    ]
    return render(headers, cells, indent="  ")


WIDTH = 92  # prose width; the tables are narrower than 100 columns too


def _paragraph(text: str) -> str:
    return textwrap.fill(text, width=WIDTH)


def _notes(text: str) -> str:
    return textwrap.fill(text, width=WIDTH, initial_indent="  ", subsequent_indent="    ")


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report."""
    rows = report["operations"]
    overhead = {style: Overhead(**values) for style, values in report["overhead"].items()}
    adaptive = next(row for row in rows if row["operation"] == ADAPTIVE_OPERATION)
    rounds = next(iter(overhead.values())).rounds
    out = [
        f"meterage demo: {len(rows)} operations of a synthetic workload, metered "
        f"(--duration {report['duration']:g})",
        "",
        *(f"  {row['operation']:<18}{row['what']}" for row in rows),
        "",
        _paragraph(
            "Every call is counted and timed. The probes that work here "
            f"({', '.join(workload_probes(report['probes']))}) ran on every call (sample=1.0), "
            "except on "
            f"{ADAPTIVE_OPERATION}, which keeps the default adaptive budget (the probes may "
            f"cost 1% of its wall time): they ran on {adaptive['probed']:,} of its "
            f"{adaptive['calls']:,} calls ({format_share(adaptive['probed_share'])}), so its "
            "resource figures are estimates, each probed call weighted by 1/p."
        ),
    ]
    for name, why in report["probes"].items():
        if why and name != "gpu":  # the GPU section says its own
            out.append(_paragraph(f"Probe {name!r} is unavailable here ({why}); n/a below."))
    out += [
        "",
        "Time per call (latency quantiles over all calls; cpu/call is a mean):",
        "",
        _format_time_table(rows),
        "",
    ]
    for probe in meterage._native.PROBES:
        if probe["name"] not in OWN_SECTIONS:
            out += [
                f"Per call, {probe['name']} probe (means):",
                "",
                _format_probe_table(rows, probe["name"]),
                "",
            ]
    for row in rows:
        if row["errors_by_type"]:
            kinds = ", ".join(
                f"{kind} {count:,}" for kind, count in sorted(row["errors_by_type"].items())
            )
            out.append(
                _notes(
                    f"{row['operation']}: errors by error.type: {kinds}; the driver caught "
                    f"{row['driver']['errors']:,}."
                )
            )
        dynamic = [s for s in row["series"] if "batch.size" in s["attributes"]]
        if dynamic:
            split = ", ".join(
                f"{s['attributes']['batch.size']} {s['calls']:,}"
                for s in sorted(dynamic, key=lambda s: str(s["attributes"]["batch.size"]))
            )
            out.append(
                _notes(f"{row['operation']}: calls by dynamic attribute batch.size: {split}.")
            )
    perturbed = [
        row["operation"]
        for row in rows
        if row["per_call"]["cpu.time"] is not None
        and row["wall_per_call_s"] is not None
        and row["per_call"]["cpu.time"] > row["wall_per_call_s"]
    ]
    if perturbed:
        out.append(
            _notes(
                f"{', '.join(perturbed)}: cpu/call exceeds the mean wall time of all calls: on "
                "calls this short, the probed ones run slower (the probe syscalls leave caches "
                "cold), and only probed calls report CPU."
            )
        )
    out += [
        _notes(
            "io: bytes of every read/write syscall; disk: bytes that reached storage (0 on "
            "tmpfs, or when reads come from the page cache)."
        ),
        _notes(
            "memory: bytes through CPython's allocators (a list's growth counts each new "
            "size); retained: the call's own allocations still held when it ended "
            "(demo.cache_fill keeps its records, demo.render nothing); peak: the most they "
            "held at once."
        ),
        "",
        *_gpu_section(report),
        "Custom instruments:",
        "",
        _format_instruments(report["instruments"]),
        "",
        _paragraph(
            "Metering overhead, measured on this machine in this run: empty stand-ins, bare vs. "
            f"metered, {rounds} interleaved rounds, medians of the per-call differences."
        ),
        "",
        _format_overhead(overhead),
        "",
        _paragraph(
            "The overhead column above = timer-only overhead + probe cost x probed share, per "
            "call (per step x steps per call for generators and coroutines). It is what "
            "meterage added to each call; timings on a busy machine vary."
        ),
        "",
        f"Ran in {report['elapsed_s']:.1f} s (workload {report['workload_s']:.1f} s, "
        f"overhead measurement {report['overhead_s']:.1f} s).",
    ]
    return "\n".join(out)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


# ---- entry points ----------------------------------------------------------------------


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _port(text: str) -> int:
    """A TCP port to listen on, 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port from 1 to 65535, got {text}")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options."""
    parser.add_argument(
        "--duration",
        type=_positive_seconds,
        default=DEFAULT_DURATION,
        metavar="SECONDS",
        help="scale the workload to about this many seconds (default %(default)s); "
        "the overhead measurement adds a fraction of a second",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the results as JSON instead of tables",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="then keep the workload running with a Prometheus scrape endpoint up "
        "(needs meterage[otel])",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address of the --serve endpoint (%(default)s)"
    )
    parser.add_argument(
        "--port", type=_port, default=9464, help="port of the --serve endpoint (%(default)s)"
    )


def collect(duration: float) -> dict[str, Any]:
    """Runs the workload and the overhead measurement; returns the report as plain data."""
    started = time.perf_counter()
    # The demo owns this process: start from empty series so only its own calls show.
    meterage.reset()
    probes = meterage.available_probes()
    with tempfile.TemporaryDirectory(prefix="meterage-demo-") as directory:
        probe_names = workload_probes(probes)
        workload = Workload(directory, probe_names)
        driver = run_workload(workload, plan(duration))
    snapshot = meterage.snapshot()
    workload_s = time.perf_counter() - started
    overhead_started = time.perf_counter()
    # Shorter timings for a quick --duration; 4 ms per timing is plenty for a stable median.
    overhead = measure_overhead(
        target_seconds=0.004 * min(1.0, max(0.25, duration / DEFAULT_DURATION)),
        probes=probe_names,
    )
    overhead_s = time.perf_counter() - overhead_started
    return {
        "duration": duration,
        "probes": probes,
        "gpus": meterage.gpu_info()["devices"],
        "operations": operation_rows(snapshot, overhead, driver),
        "instruments": instrument_rows(snapshot),
        "overhead": {
            style: {
                "style": cost.style,
                "label": cost.label,
                "bare_s": cost.bare_s,
                "timer_only_s": cost.timer_only_s,
                "all_probes_s": cost.all_probes_s,
                "rounds": cost.rounds,
            }
            for style, cost in overhead.items()
        },
        "workload_s": workload_s,
        "overhead_s": overhead_s,
        "elapsed_s": time.perf_counter() - started,
    }


def run(options: argparse.Namespace) -> int:
    """Runs the demo for parsed options; returns the exit status."""
    provider = None
    if options.serve:
        from meterage.cli.serve import start_endpoint

        # A server is stopped with SIGTERM (systemd, docker, kill): stop as on Ctrl-C, so
        # the workload's scratch directories are removed and the endpoint shut down.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        provider = start_endpoint(options.host, options.port)
    report = collect(options.duration)
    if options.json:
        json.dump(_finite(report), sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    if provider is not None:
        from meterage.cli.serve import keep_running

        try:
            return keep_running(options.host, options.port)
        finally:
            provider.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meterage demo [options]`` as a function."""
    parser = argparse.ArgumentParser(prog="python -m meterage demo", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
