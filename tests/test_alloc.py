"""The ``alloc`` probe against truth: what a call allocates, retains and peaks at, per
thread and per task, next to tracemalloc and memray in either order.

Checks that need a process of their own (whether the hooks are installed at all, a failed
install, another tool started before meterage) run in a child interpreter.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from typing import Any

import pytest

import meterage

MEASURES = ("memory.allocated", "memory.allocations", "memory.retained", "memory.peak")


def run_python(code: str, timeout: float = 120) -> Any:
    """Runs ``code`` in a fresh interpreter; returns the JSON it prints last."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"child failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.splitlines()[-1])


def memory(operation: str) -> dict[str, Any]:
    """The one call series of ``operation``: its memory histograms by measure."""
    (series,) = [s for s in meterage.snapshot() if s.operation == operation]
    return {key: series.histograms[key] for key in MEASURES if key in series.histograms}


def _cached(value: Any) -> bool:
    """Objects CPython never allocates: small ints and one-character latin-1 strings."""
    if isinstance(value, int):
        return -5 <= value <= 256
    return isinstance(value, str) and len(value) == 1 and ord(value) < 256


def held_bytes(values: list[Any]) -> int:
    """What ``sys.getsizeof`` says a list and its items hold, less the items CPython caches."""
    return sys.getsizeof(values) + sum(sys.getsizeof(v) for v in values if not _cached(v))


def test_a_list_of_ten_thousand_ints_is_allocated_and_retained(unique: Callable[..., str]) -> None:
    name = unique()
    build = meterage.meter(name, probes=("alloc",), sample=1.0)(lambda n: list(range(n)))
    kept = build(10_000)
    found = memory(name)
    truth = held_bytes(kept)
    assert found["memory.allocated"].sum >= truth
    assert found["memory.retained"].sum >= truth
    # Nothing else of size was made: the list's buffer and 9,743 ints, with little more.
    assert found["memory.retained"].sum <= truth * 1.2
    assert found["memory.allocations"].sum >= 10_000 - 261
    assert found["memory.peak"].sum >= found["memory.retained"].sum
    assert found["memory.allocated"].count == 1


def test_memory_allocated_and_freed_in_the_call_is_not_retained(unique: Callable[..., str]) -> None:
    name = unique()

    @meterage.meter(name, probes=("alloc",), sample=1.0)
    def churn() -> int:
        total = 0
        for _ in range(20):
            block = [str(i) for i in range(1000)]
            total += len(block)
            del block
        return total

    assert churn() == 20_000
    found = memory(name)
    one_block = held_bytes([str(i) for i in range(1000)])
    assert found["memory.allocated"].sum >= 20 * one_block
    # The call keeps an int and at most a few small objects of the interpreter's own.
    assert found["memory.retained"].sum < 1024
    # At most one block (and the list being built) was live at a time.
    assert one_block <= found["memory.peak"].sum <= 2.5 * one_block


def test_freeing_memory_from_before_the_call_is_not_credited(unique: Callable[..., str]) -> None:
    name = unique()
    old = [str(i) for i in range(5000)]
    new: list[Any] = []

    @meterage.meter(name, probes=("alloc",), sample=1.0)
    def swap() -> None:
        old.clear()  # frees about 250 kB made before the call: not the call's
        new.append([str(i) for i in range(100)])

    swap()
    found = memory(name)
    # Had the older frees been credited, retained would be 0 (it never goes below).
    kept = held_bytes(new[0])
    # Also kept: the first item slots of ``new`` and, on 3.10, the frames made for the
    # first call (each under 1 kB).
    assert kept <= found["memory.retained"].sum < kept + 2048
    # The list's growth counts each new size: a few times what it ends up holding.
    assert kept <= found["memory.allocated"].sum < 4 * kept


def test_threads_are_charged_their_own_allocations_only(unique: Callable[..., str]) -> None:
    name = unique()
    started, stop = threading.Event(), threading.Event()

    def noisy() -> None:
        started.set()
        while not stop.is_set():
            junk = [bytes(100) for _ in range(200)]
            del junk

    @meterage.meter(name, probes=("alloc",), sample=1.0)
    def small() -> list[int]:
        out = []
        for i in range(1000, 1100):
            out.append(i)
            # Let the noisy thread run in the middle of the call.
            if i % 10 == 0:
                os.sched_yield()
        return out

    thread = threading.Thread(target=noisy)
    thread.start()
    started.wait()
    try:
        results = [small() for _ in range(50)]
    finally:
        stop.set()
        thread.join()
    found = memory(name)
    allocated = found["memory.allocated"]
    assert allocated.count == 50
    # Each call made 100 ints and grew its list (each growth counts its new size): the
    # same few kB every time. One round of the noisy thread is 200 bytes objects, 26 kB.
    assert allocated.min >= held_bytes(results[0])
    # (3.10 makes and keeps frame objects on some calls: under 1 kB.)
    assert allocated.max - allocated.min <= 1024
    assert allocated.max < 20_000


def test_many_threads_each_measure_the_same_call_the_same(unique: Callable[..., str]) -> None:
    name = unique()
    work = meterage.meter(name, probes=("alloc",), sample=1.0)(
        lambda: [i * 7 for i in range(1000, 3000)]
    )
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(30):
            work()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    found = memory(name)
    allocated = found["memory.allocated"]
    assert allocated.count == 240
    # The same allocations in every thread: 2,000 ints and the list's growth.
    assert allocated.max <= allocated.min * 1.05


def test_a_coroutine_is_not_charged_for_other_tasks_while_it_awaits(
    unique: Callable[..., str],
) -> None:
    name = unique()

    @meterage.meter(name, probes=("alloc",), sample=1.0)
    async def patient() -> list[int]:
        kept = []
        for i in range(1000, 1010):
            kept.append(i)
            await asyncio.sleep(0)
        return kept

    async def greedy() -> None:
        for _ in range(10):
            junk = [str(i) for i in range(10_000)]
            del junk
            await asyncio.sleep(0)

    async def main() -> list[int]:
        kept, _ = await asyncio.gather(patient(), greedy())
        return kept

    kept = asyncio.run(main())
    found = memory(name)
    # Ten ints and a small list, a few frames' worth of the event loop's own objects;
    # greedy's 100,000 strings (over 5 MB) are not in it.
    assert held_bytes(kept) <= found["memory.allocated"].sum < 64 * 1024
    assert found["memory.allocated"].count == 1


def test_a_generators_steps_are_summed_and_its_peak_is_the_largest_step(
    unique: Callable[..., str],
) -> None:
    name = unique()

    @meterage.meter(name, probes=("alloc",), sample=1.0)
    def chunks() -> Any:
        for size in (1000, 4000, 2000):
            yield [str(i) for i in range(size)]

    sizes = [held_bytes(chunk) for chunk in chunks()]
    found = memory(name)
    assert found["memory.allocated"].sum >= sum(sizes)
    # Each step's chunk outlives its step: retained adds them up.
    assert found["memory.retained"].sum >= sum(sizes)
    assert max(sizes) <= found["memory.peak"].sum < sum(sizes)


def test_nested_calls_see_their_own_blocks(unique: Callable[..., str]) -> None:
    outer_name, inner_name = unique("outer"), unique("inner")
    inner = meterage.meter(inner_name, probes=("alloc",), sample=1.0)(
        lambda: [str(i) for i in range(2000)]
    )

    @meterage.meter(outer_name, probes=("alloc",), sample=1.0)
    def outer() -> list[Any]:
        first = [str(i) for i in range(3000)]
        second = inner()
        del first
        return second

    kept = outer()
    inner_found, outer_found = memory(inner_name), memory(outer_name)
    assert inner_found["memory.retained"].sum >= held_bytes(kept)
    # The outer call freed its own first list: it keeps only the inner one's.
    assert held_bytes(kept) <= outer_found["memory.retained"].sum < 1.2 * held_bytes(kept)
    assert outer_found["memory.allocated"].sum >= inner_found["memory.allocated"].sum
    assert outer_found["memory.peak"].sum > inner_found["memory.peak"].sum


def test_a_call_that_raises_is_measured_and_its_exception_unchanged(
    unique: Callable[..., str],
) -> None:
    name = unique()

    class Boom(Exception):
        pass

    @meterage.meter(name, probes=("alloc",), sample=1.0)
    def fails() -> None:
        data = [str(i) for i in range(1000)]
        raise Boom(len(data))

    with pytest.raises(Boom) as raised:
        fails()
    assert raised.value.args == (1000,)
    (series,) = [s for s in meterage.snapshot() if s.operation == name]
    assert str(series.attributes["error.type"]).endswith("Boom")
    assert series.histograms["memory.allocated"].sum >= held_bytes([str(i) for i in range(1000)])


def test_gc_during_a_call_and_frees_from_other_threads_stay_consistent(
    unique: Callable[..., str],
) -> None:
    name = unique()
    handed: list[Any] = []
    lock = threading.Lock()

    @meterage.meter(name, probes=("alloc",), sample=1.0)
    def make() -> None:
        batch = [[i] for i in range(300)]
        # A collection of the young objects (a full one would cost ~100 ms in the suite's
        # heap): it frees the cycles the consumer thread left, in this call.
        gc.collect(0)
        with lock:
            handed.append(batch)

    def consumer(stop: threading.Event) -> None:
        while not stop.is_set() or handed:
            cycle: list[Any] = [[0] * 20]
            cycle.append(cycle)  # garbage only the collector frees
            del cycle
            with lock:
                if handed:
                    handed.pop()

    stop = threading.Event()
    thread = threading.Thread(target=consumer, args=(stop,))
    thread.start()
    for _ in range(100):
        make()
    stop.set()
    thread.join()
    found = memory(name)
    assert found["memory.allocated"].count == 100
    for histogram in found.values():
        assert histogram.min >= 0
    assert found["memory.retained"].max <= found["memory.peak"].max <= found["memory.allocated"].max


def test_the_hooks_are_installed_only_when_a_meter_asks_for_alloc() -> None:
    result = run_python(
        """
        import ctypes, json
        import meterage

        class Allocator(ctypes.Structure):
            functions = ("malloc", "calloc", "realloc", "free")
            _fields_ = [("ctx", ctypes.c_void_p)] + [(n, ctypes.c_void_p) for n in functions]

        def tops():
            out = []
            for domain in (0, 1, 2):
                found = Allocator()
                ctypes.pythonapi.PyMem_GetAllocator(domain, ctypes.byref(found))
                out.append((found.ctx, found.malloc))
            return out

        before = tops()
        plain = meterage.meter("plain", probes=("cpu", "rusage", "io"), sample=1.0)(len)
        plain([1])
        meterage.available_probes(["alloc"])
        untouched = tops() == before
        meterage.meter("counted", probes=("alloc",))
        after = tops()
        changed = [a != b for a, b in zip(after, before)]
        print(json.dumps({"untouched": untouched, "changed": changed}))
        """
    )
    assert result == {"untouched": True, "changed": [True, True, True]}


def test_refused_hooks_give_one_warning_and_the_other_probes_work() -> None:
    result = run_python(
        """
        import json, warnings
        import meterage

        meterage._native._refuse_alloc_hooks()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            work = meterage.meter("w", probes=("cpu", "alloc"), sample=1.0)(lambda: [0] * 1000)
            again = meterage.meter("w2", probes=("alloc",), sample=1.0)(lambda: None)
            work(); again()
        (series,) = [s for s in meterage.snapshot() if s.operation == "w"]
        print(json.dumps({
            "warnings": [str(w.message) for w in caught],
            "histograms": sorted(series.histograms),
            "probes": list(work.meter.probes) if hasattr(work, "meter") else None,
            "reason": meterage.available_probes(["alloc"])["alloc"],
        }))
        """
    )
    (warning,) = result["warnings"]
    assert "'alloc' is unavailable" in warning and "refused" in warning
    assert result["histograms"] == ["cpu.time", "duration"]
    assert "refused" in result["reason"]


WORKLOAD = """
import json, sys, tracemalloc
import meterage

def workload():
    return [str(i) * 3 for i in range(5000)]

def traced():
    # What tracemalloc says the workload left allocated (its second run: the first warms
    # caches up).
    for _ in range(2):
        tracemalloc.clear_traces()
        before = tracemalloc.get_traced_memory()[0]
        kept = workload()
        grown = tracemalloc.get_traced_memory()[0] - before
        del kept
    return grown

metered = meterage.meter("work", probes=("alloc",), sample=1.0)(workload)

def measured():
    metered()  # a warm-up (3.10 makes the frames of a function's first call)
    meterage.reset()
    kept = [metered() for _ in range(2)]
    (series,) = [s for s in meterage.snapshot() if s.operation == "work"]
    return {key: series.histograms[key].max for key in
            ("memory.allocated", "memory.allocations", "memory.retained", "memory.peak")}
"""


def test_tracemalloc_and_meterage_agree_with_themselves_in_either_order() -> None:
    result = run_python(
        WORKLOAD
        + """
alone = measured()
tracemalloc.start()
traced_alone = traced()
with_tracemalloc = measured()
tracemalloc.stop()
after_stop = measured()
print(json.dumps({"alone": alone, "with": with_tracemalloc, "after_stop": after_stop,
                  "traced": traced_alone}))
"""
    )
    started_before = run_python(
        """
import tracemalloc
tracemalloc.start()
"""
        + WORKLOAD
        + """
traced_first = traced()
measured()  # installs meterage's hooks on top of tracemalloc's
traced_with = traced()
with_tracemalloc = measured()
tracemalloc.stop()
after_stop = measured()
tracemalloc.start()
traced_again = traced()
print(json.dumps({"traced_first": traced_first, "traced_with": traced_with,
                  "traced_again": traced_again, "with": with_tracemalloc,
                  "after_stop": after_stop}))
"""
    )
    without_meterage = run_python(
        """
import json, tracemalloc
def workload():
    return [str(i) * 3 for i in range(5000)]
tracemalloc.start()
grown = 0
for _ in range(2):
    tracemalloc.clear_traces()
    before = tracemalloc.get_traced_memory()[0]
    kept = workload()
    grown = tracemalloc.get_traced_memory()[0] - before
    del kept
print(json.dumps(grown))
"""
    )
    # meterage counts the same with tracemalloc below or above it, and after it stops.
    assert result["alone"] == result["with"] == result["after_stop"]
    assert started_before["with"] == started_before["after_stop"] == result["alone"]
    # tracemalloc traces the same with meterage's hooks below or above it.
    assert (
        without_meterage
        == result["traced"]
        == started_before["traced_first"]
        == started_before["traced_with"]
        == started_before["traced_again"]
    )


MEMRAY = """
import json, sys
import memray
import meterage

def workload():
    return [str(i) * 3 for i in range(5000)]

order, path = sys.argv[1], sys.argv[2]

def measured(metered):
    metered()  # a warm-up (3.10 makes the frames of a function's first call)
    meterage.reset()
    kept = [metered() for _ in range(2)]
    (series,) = [s for s in meterage.snapshot() if s.operation == "work"]
    return {key: series.histograms[key].max for key in
            ("memory.allocated", "memory.allocations", "memory.retained", "memory.peak")}

def tracked():
    # How many allocations memray saw the workload make through the Python allocators.
    with memray.Tracker(path + ".workload", trace_python_allocators=True):
        kept = workload()
    kinds = {"PYMALLOC_MALLOC", "PYMALLOC_CALLOC", "PYMALLOC_REALLOC"}
    records = memray.FileReader(path + ".workload").get_allocation_records()
    return sum(1 for r in records if memray.AllocatorType(r.allocator).name in kinds)

out = {}
if order == "memray-first":
    with memray.Tracker(path, trace_python_allocators=True):
        metered = meterage.meter("work", probes=("alloc",), sample=1.0)(workload)
        out["inside"] = measured(metered)
    out["outside"] = measured(metered)
elif order == "meterage-first":
    metered = meterage.meter("work", probes=("alloc",), sample=1.0)(workload)
    out["outside"] = measured(metered)
    with memray.Tracker(path, trace_python_allocators=True):
        out["inside"] = measured(metered)
    out["after"] = measured(metered)
else:
    # The same history but meterage's: one tracker before (memray's second tracker in a
    # process records a few allocations fewer of its own than its first).
    with memray.Tracker(path, trace_python_allocators=True):
        workload()
out["tracked"] = tracked()
print(json.dumps(out))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="memray runs on Linux and macOS only")
def test_memray_and_meterage_agree_with_themselves_in_either_order(tmp_path: Any) -> None:
    pytest.importorskip("memray")
    results = {}
    for order in ("memray-first", "meterage-first", "without-meterage"):
        completed = subprocess.run(
            [sys.executable, "-c", MEMRAY, order, str(tmp_path / f"{order}.bin")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        results[order] = json.loads(completed.stdout.splitlines()[-1])
    first, second = results["memray-first"], results["meterage-first"]
    # Without a tracker running, meterage counts the same whichever was first, and after
    # memray stopped.
    assert first["outside"] == second["outside"] == second["after"]
    # A running tracker makes the frame objects of its profile hook: a few allocations.
    for result in (first, second):
        extra = {key: result["inside"][key] - result["outside"][key] for key in result["inside"]}
        assert 0 <= extra["memory.allocations"] <= 64, extra
        assert 0 <= extra["memory.allocated"] <= 8192, extra
    # memray sees the same allocations with meterage's hooks below it as without them.
    assert first["tracked"] == second["tracked"] == results["without-meterage"]["tracked"]


def test_a_fork_child_measures_its_own_calls() -> None:
    result = run_python(
        """
        import json, os, threading
        import meterage

        meter = meterage.meter("forked", probes=("alloc",), sample=1.0)
        work = meter(lambda: [str(i) for i in range(1000)])
        work()
        spinning = threading.Event()
        def spin():
            while not spinning.is_set():
                work()
        thread = threading.Thread(target=spin); thread.start()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            meterage.reset()
            kept = [work() for _ in range(3)]
            (s,) = [s for s in meterage.snapshot() if s.operation == "forked"]
            os.write(write, json.dumps([s.count, s.histograms["memory.allocated"].min]).encode())
            os._exit(0)
        os.close(write)
        spinning.set(); thread.join()
        child = json.loads(os.read(read, 1000))
        os.waitpid(pid, 0)
        (s,) = [s for s in meterage.snapshot() if s.operation == "forked"]
        print(json.dumps({"child": child, "parent_min": s.histograms["memory.allocated"].min}))
        """
    )
    count, child_min = result["child"]
    assert count == 3
    assert child_min >= 0.9 * result["parent_min"] > 0


def test_memory_is_exported_and_on_spans(unique: Callable[..., str]) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import meterage.otel

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    assert meterage.otel.span_attributes(tracer_provider) is True
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    name = unique()
    work = meterage.meter(name, probes=("alloc",), sample=1.0)(lambda: [str(i) for i in range(500)])
    meterage.otel.attach(provider, process=False)
    try:
        with tracer_provider.get_tracer("t").start_as_current_span("request"):
            work()
            work()
        data = reader.get_metrics_data()
    finally:
        meterage.otel.detach(provider)
        meterage.otel.span_attributes(enabled=False)
        # attach() counts calls in flight from then on; the tests after this one do not.
        meterage._native.set_active_tracking(False)
        provider.shutdown()
        tracer_provider.shutdown()
    assert data is not None
    points = {
        metric.name: metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    for metric, unit in (
        ("meterage.call.memory.allocated", "By"),
        ("meterage.call.memory.allocations", "{allocation}"),
        ("meterage.call.memory.retained", "By"),
        ("meterage.call.memory.peak", "By"),
    ):
        assert points[metric].unit == unit
        (point,) = [
            p
            for p in points[metric].data.data_points
            if p.attributes.get("meterage.operation") == name
        ]
        assert point.count == 2
    (span,) = exporter.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert attributes["meterage.memory.allocated"] >= 2 * held_bytes([str(i) for i in range(500)])
    assert attributes["meterage.memory.allocations"] >= 1000
    # The span's peak is its largest call's, not the sum of two.
    assert attributes["meterage.memory.peak"] < attributes["meterage.memory.allocated"]


def test_a_block_that_ends_on_another_thread_leaves_the_first_thread_exact(
    unique: Callable[..., str],
) -> None:
    # A streaming body as Starlette runs it: a sync generator whose steps run in a thread
    # pool, here each in a new thread. The block began in one thread and ends in another.
    streamed, after = unique("stream"), unique("after")
    meter = meterage.meter(streamed, probes=("alloc",), sample=1.0)

    def body() -> Any:
        with meter:
            for index in range(3):
                yield [str(i) for i in range(100 * index)]

    chunks = body()

    def step() -> None:
        next(chunks, None)

    for _ in range(4):
        thread = threading.Thread(target=step)
        thread.start()
        thread.join()
    (series,) = [s for s in meterage.snapshot() if s.operation == streamed]
    # Two threads' counters do not subtract: the block keeps its wall time only.
    assert series.count == 1 and series.histograms["memory.allocated"].count == 0
    # The thread it began on dropped the block's level: later calls there are exact.
    work = meterage.meter(after, probes=("alloc",), sample=1.0)(
        lambda: [str(i) for i in range(1000)]
    )
    kept = work()
    found = memory(after)
    assert held_bytes(kept) <= found["memory.retained"].sum < 1.2 * held_bytes(kept)


def test_many_threads_with_nested_and_abandoned_calls_stay_consistent(
    unique: Callable[..., str],
) -> None:
    outer_name, inner_name = unique("outer"), unique("inner")
    inner = meterage.meter(inner_name, probes=("alloc",), sample=1.0)
    errors: list[BaseException] = []

    @meterage.meter(outer_name, probes=("alloc",), sample=1.0)
    def outer(seed: int) -> list[Any]:
        kept = []
        for round_index in range(20):
            with inner:
                kept.append([seed * round_index] * 50)
            cycle: list[Any] = [[seed] * 20]
            cycle.append(cycle)  # garbage the collector frees, in whichever thread runs it
            del cycle
            if round_index % 5 == 0:
                gc.collect(0)  # the young objects only: a full collection costs ~100 ms here
            # A generator given up half way: its block never ends normally.
            abandoned = stepping()
            next(abandoned)
            del abandoned
        return kept

    def stepping() -> Any:
        with inner:
            yield [0] * 10
            yield [1] * 10

    def worker(seed: int) -> None:
        try:
            for _ in range(10):
                outer(seed)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    found = memory(outer_name)
    assert found["memory.allocated"].count == 80
    assert found["memory.retained"].min > 0
    assert found["memory.retained"].max <= found["memory.peak"].max
    inner_found = memory(inner_name)
    assert inner_found["memory.allocated"].count >= 80 * 20
