"""Threads record without losing a single value; a forked child starts empty and works, and
the parent's data is untouched."""

from __future__ import annotations

import json
import os
import sys
import threading

import pytest

import meterage

THREADS = 8
PER_THREAD = 5000


def run_threads(target, count=THREADS):
    """Starts ``count`` threads on ``target(index)`` together and joins them."""
    barrier = threading.Barrier(count)
    errors = []

    def body(index):
        try:
            barrier.wait()
            target(index)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    # Switch threads often, so their calls really interleave.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


def test_threads_count_every_call_exactly(unique, one_series):
    name = unique()
    f = meterage.meter(name)(lambda x: x)

    def work(_):
        for i in range(PER_THREAD):
            f(i)

    run_threads(work)
    series = one_series(name)
    assert series.count == THREADS * PER_THREAD
    assert series.histograms["duration"].count == THREADS * PER_THREAD
    assert 1 <= series.sampled <= THREADS * PER_THREAD


def test_threads_probe_every_call_at_sample_one(unique, one_series):
    name = unique()
    f = meterage.meter(name, probes=("cpu", "io"), sample=1.0)(lambda: None)

    def work(_):
        for _ in range(PER_THREAD // 5):
            f()

    run_threads(work)
    series = one_series(name)
    total = THREADS * PER_THREAD // 5
    assert series.count == total
    assert series.sampled == total
    for key in ("cpu.time", "io.read", "io.write"):
        assert series.histograms[key].count == total, key
    # No thread's probe reads leak into any call, whatever the interleaving.
    assert series.histograms["io.read"].sum == 0


def test_threads_with_errors_and_dynamic_attributes(unique, series_of):
    name = unique()
    m = meterage.meter(name)

    @m
    def maybe_fail(i):
        if i % 4 == 0:
            raise ValueError(i)
        return i

    def work(index):
        for i in range(1000):
            try:
                maybe_fail(i)
            except ValueError:
                pass
            with m as call:
                call.set_attribute("thread", index)

    run_threads(work)
    counts = {tuple(sorted(s.attributes.items())): s.count for s in series_of(name)}
    expected = {(("thread", index),): 1000 for index in range(THREADS)}
    expected[()] = THREADS * 750
    expected[(("error.type", "ValueError"),)] = THREADS * 250
    assert counts == expected


def test_custom_histogram_is_exact_under_threads(unique, one_series):
    name = unique()
    histogram = meterage.histogram(name, unit="{item}")

    def work(index):
        for i in range(1, PER_THREAD + 1):
            histogram.record(i)
            histogram.record(i, attributes={"thread": index % 2})

    run_threads(work)
    total = THREADS * PER_THREAD
    expected_sum = THREADS * PER_THREAD * (PER_THREAD + 1) // 2  # integers: exact in f64
    snapshot = histogram.snapshot()
    assert (snapshot.count, snapshot.sum, snapshot.min, snapshot.max) == (
        total,
        expected_sum,
        1,
        PER_THREAD,
    )
    assert sum(snapshot.bucket_counts) + snapshot.zero_count == total
    for parity in (0, 1):
        half = histogram.snapshot({"thread": parity})
        assert half.count == total // 2
        assert half.sum == expected_sum // 2
    assert one_series(name, {}).count == total


def test_counter_is_exact_under_threads(unique, one_series):
    name = unique()
    counter = meterage.counter(name)

    def work(index):
        for _ in range(PER_THREAD):
            counter.add(1)
            counter.add(2, attributes={"thread": index})

    run_threads(work)
    assert counter.value() == THREADS * PER_THREAD
    for index in range(THREADS):
        assert counter.value({"thread": index}) == 2 * PER_THREAD
    series = one_series(name, {})
    assert series.kind == "counter"
    assert series.value == THREADS * PER_THREAD
    assert series.count == THREADS * PER_THREAD  # adds


def test_threads_creating_the_same_series_at_once(unique, series_of):
    # Every thread creates the same 50 new attribute sets at the same time: one series each.
    name = unique()
    m = meterage.meter(name)

    def work(_):
        for key in range(50):
            with m as call:
                call.set_attribute("key", key)

    run_threads(work)
    series = series_of(name)
    assert sorted(s.attributes["key"] for s in series) == list(range(50))
    assert all(s.count == THREADS for s in series)


def test_meters_created_concurrently_share_the_operation(unique, one_series):
    name = unique()

    def work(_):
        f = meterage.meter(name)(lambda: None)
        for _ in range(100):
            f()

    run_threads(work)
    assert one_series(name).count == THREADS * 100


# ---- fork --------------------------------------------------------------------------------------


def in_child(body):
    """Runs ``body()`` in a forked child; returns what it returned (JSON over a pipe)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            os.close(read_end)
            payload = json.dumps({"ok": body()})
        except BaseException as error:
            payload = json.dumps({"error": repr(error)})
            code = 1
        try:
            with os.fdopen(write_end, "w") as pipe:
                pipe.write(payload)
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        received = pipe.read()
    _, status = os.waitpid(pid, 0)
    result = json.loads(received)
    assert "error" not in result, result.get("error")
    assert os.waitstatus_to_exitcode(status) == 0
    return result["ok"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_children_draw_their_own_sampling_coins(unique):
    name = unique()

    @meterage.meter(name, probes=("cpu",), sample=0.5)
    def work(index):
        return index

    def child():
        for index in range(400):
            work(index)
        (series,) = [s for s in meterage.snapshot() if s.operation == name]
        return series.sampled

    # Children with the parent's random state would probe the same calls; independent coins
    # give Binomial(400, 0.5) counts (sd 10): all five equal with probability ~1e-6.
    counts = [in_child(child) for _ in range(5)]
    assert all(100 < count < 300 for count in counts), counts
    assert len(set(counts)) > 1, counts


def describe():
    return sorted(
        [s.kind, s.operation, sorted(s.attributes.items()), s.count] for s in meterage.snapshot()
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_starts_empty_and_parent_is_untouched(tmp_path, unique, one_series):
    name = unique()
    histogram = meterage.histogram(unique("h"))
    counter = meterage.counter(unique("c"))
    path = tmp_path / "child.bin"

    @meterage.meter(name, sample=1.0)
    def work(size):
        if size:
            with open(path, "wb", buffering=0) as handle:
                handle.write(b"c" * size)
        return size

    for _ in range(3):
        work(0)
    histogram.record(7)
    counter.add(5)
    parent_before = describe()

    def child():
        empty = describe()
        work(4321)
        work(0)
        histogram.record(1)
        counter.add(1)
        series = one_series(name)
        return {
            "empty": empty,
            "count": series.count,
            "sampled": series.sampled,
            "written": series.histograms["io.write"].sum,
            "histogram": [histogram.snapshot().count, histogram.snapshot().sum],
            "counter": counter.value(),
            "after": describe(),
        }

    result = in_child(child)
    # The child started with nothing recorded...
    assert result["empty"] == []
    # ... and recorded its own calls normally, probes included: its IO reading is its own
    # thread's (the probe reopens /proc/thread-self/io after the fork), exact to the byte.
    assert result["count"] == 2
    assert result["sampled"] == 2
    assert result["written"] == 4321
    assert result["histogram"] == [1, 1.0]
    assert result["counter"] == 1.0
    assert len(result["after"]) == 3
    # The parent's data is untouched by the child's reset and records.
    assert describe() == parent_before
    assert one_series(name).count == 3
    assert histogram.snapshot().sum == 7
    assert counter.value() == 5
    # And the parent keeps working.
    work(0)
    assert one_series(name).count == 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_other_threads_record(unique):
    # Lock-free recording: a fork in the middle of other threads' records cannot leave a
    # lock held in the child, which must be able to record and snapshot.
    name = unique()
    f = meterage.meter(name, sample=1.0)(lambda: None)
    histogram = meterage.histogram(unique("h"))
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            f()
            histogram.record(3, attributes={"k": "v"})

    threads = [threading.Thread(target=spin) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):

            def child():
                before = len(meterage.snapshot())
                for _ in range(10):
                    f()
                histogram.record(1)
                counts = {s.operation: s.count for s in meterage.snapshot()}
                return [before, counts.get(name), histogram.snapshot().count]

            assert in_child(child) == [0, 10, 1]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    parent = {s.operation: s.count for s in meterage.snapshot()}
    assert parent[name] > 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_multiprocessing_fork_context(unique):
    import multiprocessing

    name = unique()
    square = meterage.meter(name)(_square)
    square(2)
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_process, args=(sender, square))
    process.start()
    sender.close()
    before, result, after = receiver.recv()
    process.join()
    assert process.exitcode == 0
    # The child started with nothing and recorded its own one call.
    assert before == []
    assert result == 9
    assert after == [[name, 1]]
    assert [[s.operation, s.count] for s in meterage.snapshot()] == [[name, 1]]


def _square(x):
    return x * x


def _child_process(sender, square):
    before = [[s.operation, s.count] for s in meterage.snapshot()]
    result = square(3)
    after = [[s.operation, s.count] for s in meterage.snapshot()]
    sender.send((before, result, after))
    sender.close()
