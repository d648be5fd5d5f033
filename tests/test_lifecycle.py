"""Lifecycle: what `meterage.reset()` and `os.fork()` do to series, budgets and calls in flight."""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import meterage

OVERFLOW = {"otel.metric.overflow": True}


@pytest.fixture
def tracking() -> Iterator[None]:
    """Calls in flight are counted (as `meterage.otel.attach` switches on)."""
    meterage._native.set_active_tracking(True)
    yield
    meterage._native.set_active_tracking(False)


def series_of(operation: str) -> list[meterage.Series]:
    return [s for s in meterage.snapshot() if s.operation == operation]


def attribute_sets(operation: str) -> list[dict]:
    return sorted((s.attributes for s in series_of(operation)), key=repr)


def counts(operation: str) -> dict[str, int]:
    return {repr(s.attributes): s.count for s in series_of(operation)}


def active_of(operation: str) -> int | None:
    found = series_of(operation)
    if not found:
        return None
    assert len(found) == 1, found
    return found[0].active


def in_child(work: Callable[[], Any]) -> Any:
    """Runs `work()` in a forked child and returns its (picklable) result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            try:
                result: tuple[str, Any] = ("ok", work())
            except BaseException as error:  # reported to the parent
                result = ("error", f"{type(error).__name__}: {error}")
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(pickle.dumps(result))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    kind, value = pickle.loads(data)
    assert kind == "ok", f"the child failed: {value}"
    return value


def recorder(how: str, name: str) -> Callable[[int], None]:
    """One record of attribute set {"i": i} into `name`, by one of the recording paths."""
    if how == "histogram":
        histogram = meterage.histogram(name)
        return lambda i: histogram.record(1.5, attributes={"i": i})
    if how == "counter":
        counter = meterage.counter(name)
        return lambda i: counter.add(2, attributes={"i": i})
    meter = meterage.meter(name, probes=())

    def record(i: int) -> None:
        with meter as call:
            call.set_attribute("i", i)

    return record


class InFlight:
    """`n` threads blocked inside metered calls of `meter` until `release()`."""

    def __init__(self, meter: meterage.Meter, n: int) -> None:
        self._release = threading.Event()
        started = threading.Semaphore(0)

        def blocked() -> None:
            with meter:
                started.release()
                self._release.wait(60)

        self._threads = [threading.Thread(target=blocked) for _ in range(n)]
        for thread in self._threads:
            thread.start()
        for _ in range(n):
            assert started.acquire(timeout=60)

    def release(self) -> None:
        self._release.set()
        for thread in self._threads:
            thread.join(60)
            assert not thread.is_alive()


# 1. A reset, and a fork child, start with the whole cardinality budget.


@pytest.mark.parametrize("how", ["histogram", "counter", "set_attribute"])
def test_reset_gives_every_operation_its_whole_cardinality_budget_back(
    unique: Callable[..., str], how: str
) -> None:
    meterage.configure(cardinality_limit=10)
    name = unique()
    record = recorder(how, name)
    for i in range(10):
        record(i)
    meterage.reset()
    for i in range(100, 110):
        record(i)
    assert attribute_sets(name) == sorted(({"i": i} for i in range(100, 110)), key=repr)
    assert OVERFLOW not in attribute_sets(name)
    assert set(counts(name).values()) == {1}


@pytest.mark.parametrize("how", ["histogram", "counter", "set_attribute"])
def test_a_fork_child_starts_with_the_whole_cardinality_budget(
    unique: Callable[..., str], how: str
) -> None:
    meterage.configure(cardinality_limit=10)
    name = unique()
    record = recorder(how, name)
    for i in range(10):
        record(i)
    parent_before = attribute_sets(name)

    def child() -> list[dict]:
        for i in range(100, 110):
            record(i)
        return attribute_sets(name)

    assert in_child(child) == sorted(({"i": i} for i in range(100, 110)), key=repr)
    # The parent's series are its own, untouched by the child.
    assert attribute_sets(name) == parent_before


def test_a_meter_sent_to_overflow_gets_its_own_series_after_reset(
    unique: Callable[..., str],
) -> None:
    meterage.configure(cardinality_limit=2)
    name = unique()
    meters = [meterage.meter(name, attributes={"i": i}, probes=()) for i in range(3)]
    for meter in meters:
        with meter:
            pass
    assert attribute_sets(name) == [{"i": 0}, {"i": 1}, OVERFLOW]
    meterage.reset()
    with meters[2]:
        pass
    with meterage.meter(name, attributes={"i": 2}, probes=()):
        pass
    assert counts(name) == {repr({"i": 2}): 2}


@pytest.mark.parametrize("how", ["bound", "meter"])
def test_series_revived_through_handles_count_against_the_limit_after_reset(
    unique: Callable[..., str], how: str
) -> None:
    name = unique()
    if how == "bound":
        histogram = meterage.histogram(name)
        handles: list[Any] = [histogram.bind({"held": i}) for i in range(3)]

        def revive(handle: Any) -> None:
            handle.record(1)

        def new_set(i: int) -> None:
            histogram.record(1, attributes={"new": i})

    else:
        handles = [meterage.meter(name, attributes={"held": i}, probes=()) for i in range(3)]
        dynamic = meterage.meter(name, probes=())

        def revive(handle: Any) -> None:
            with handle:
                pass

        def new_set(i: int) -> None:
            with dynamic as call:
                call.set_attribute("new", i)

    meterage.configure(cardinality_limit=3)
    meterage.reset()
    for handle in handles:
        revive(handle)
    for i in range(3):
        new_set(i)
    own = [a for a in attribute_sets(name) if a != OVERFLOW]
    assert len(own) <= 3, own


# 2. Calls in flight are never under-counted, across a reset or a fork.


def test_calls_in_flight_across_a_reset_are_counted_exactly(
    unique: Callable[..., str], tracking: None
) -> None:
    name = unique()
    meter = meterage.meter(name, probes=())
    first = InFlight(meter, 3)
    assert active_of(name) == 3
    meterage.reset()
    # Still in flight: the series shows them (with no finished call yet).
    (series,) = series_of(name)
    assert (series.active, series.count) == (3, 0)
    first.release()
    (series,) = series_of(name)
    assert (series.active, series.count) == (0, 3)
    second = InFlight(meter, 3)
    try:
        assert active_of(name) == 3
    finally:
        second.release()
    (series,) = series_of(name)
    assert (series.active, series.count) == (0, 6)


def test_a_fork_child_counts_only_its_own_calls_in_flight(
    unique: Callable[..., str], tracking: None
) -> None:
    name = unique()
    meter = meterage.meter(name, probes=())
    parents = InFlight(meter, 3)  # the parent's calls: not the child's
    try:
        read_end, write_end = os.pipe()
        with meter:  # in flight while forking: it ends in both processes
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(read_end)
                seen = [active_of(name)]
                own = InFlight(meter, 3)
                seen.append(active_of(name))
                own.release()
                seen.append(active_of(name))
                with os.fdopen(write_end, "wb") as pipe:
                    pipe.write(pickle.dumps(seen))
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        before, during, after = pickle.loads(data)
        # None: no series of the child's yet; 0 would be right too.
        assert before in (None, 0)
        assert (during, after) == (3, 0)
        assert active_of(name) == 3  # the parent's three threads, still in flight
    finally:
        parents.release()
    assert active_of(name) == 0


# 3. A call in flight when the process forks is its parent's.


@pytest.mark.parametrize("tracked", [False, True], ids=["untracked", "tracked"])
def test_a_call_that_forks_is_recorded_by_the_parent_only(
    unique: Callable[..., str], tracked: bool
) -> None:
    meterage._native.set_active_tracking(tracked)
    try:
        name = unique()

        @meterage.meter(name, probes=())
        def work(fork: bool) -> int:
            return os.fork() if fork else -1

        read_end, write_end = os.pipe()
        pid = work(True)
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(read_end)
                after_return = counts(name)
                work(False)
                work(False)
                own = counts(name)
                with os.fdopen(write_end, "wb") as pipe:
                    pipe.write(pickle.dumps((after_return, own)))
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        after_return, own = pickle.loads(data)
        assert after_return == {}
        assert own == {"{}": 2}
        assert counts(name) == {"{}": 1}
    finally:
        meterage._native.set_active_tracking(False)


def test_a_with_block_that_forks_is_recorded_by_the_parent_only(
    unique: Callable[..., str],
) -> None:
    name = unique()
    meter = meterage.meter(name, probes=())
    read_end, write_end = os.pipe()
    with meter:
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(pickle.dumps(counts(name)))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = pickle.loads(pipe.read())
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert child == {}
    assert counts(name) == {"{}": 1}


@pytest.mark.parametrize("tracked", [False, True], ids=["untracked", "tracked"])
def test_a_generator_and_a_coroutine_in_flight_at_a_fork_are_the_parents(
    unique: Callable[..., str], tracked: bool
) -> None:
    meterage._native.set_active_tracking(tracked)
    loop = asyncio.new_event_loop()
    try:
        gen_name, co_name = unique("gen"), unique("co")

        @meterage.meter(gen_name, probes=())
        def numbers() -> Iterator[int]:
            yield 1
            yield 2

        @meterage.meter(co_name, probes=())
        async def waits(future: asyncio.Future) -> int:
            await future
            return 1

        generator = numbers()
        assert next(generator) == 1
        future = loop.create_future()
        task = loop.create_task(waits(future))
        loop.run_until_complete(asyncio.sleep(0))

        def child() -> tuple:
            assert list(generator) == [2]
            future.set_result(None)
            assert loop.run_until_complete(task) == 1
            inherited = (counts(gen_name), counts(co_name))
            assert list(numbers()) == [1, 2]
            return inherited, counts(gen_name)

        inherited, own = in_child(child)
        assert inherited == ({}, {})
        assert own == {"{}": 1}
        assert list(generator) == [2]
        future.set_result(None)
        assert loop.run_until_complete(task) == 1
        assert (counts(gen_name), counts(co_name)) == ({"{}": 1}, {"{}": 1})
        if tracked:
            assert (active_of(gen_name), active_of(co_name)) == (0, 0)
    finally:
        loop.close()
        meterage._native.set_active_tracking(False)


# 4. A fork is O(1) in the number of series and leaves the parent's pages shared.

SERIES = 20_000


def _memory() -> dict[str, int]:
    """This process's /proc/self/smaps_rollup, in bytes."""
    out = {}
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            parts = line.split()
            if len(parts) == 3 and parts[0].endswith(":") and parts[2] == "kB":
                out[parts[0][:-1]] = int(parts[1]) * 1024
    return out


def _many_series(name: str) -> tuple[meterage.Meter, int]:
    """SERIES all-probe series of one meter (each recorded once); their histogram bytes."""
    meterage.configure(cardinality_limit=SERIES + 10)
    meter = meterage.meter(name, sample=1.0)
    for i in range(SERIES):
        with meter as call:
            call.set_attribute("i", i)
    assert len(series_of(name)) == SERIES
    return meter, meterage._native.memory_bytes()


def _fork_measuring(steps: Callable[[], list[tuple[str, dict[str, int]]]]) -> list:
    # No collection in the child: it would write to every Python object's header.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        return in_child(steps)
    finally:
        gc.enable()
        gc.unfreeze()


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux smaps")
def test_a_fork_child_writes_no_page_of_series_it_does_not_use(
    unique: Callable[..., str],
) -> None:
    name = unique()
    meter, series_bytes = _many_series(name)

    def child() -> list[tuple[str, dict[str, int]]]:
        readings = [("fork", _memory())]
        with meter as call:
            call.set_attribute("i", 5)
        readings.append(("record", _memory()))
        (series,) = [s for s in meterage.snapshot() if s.operation == name]
        assert (series.attributes, series.count) == ({"i": 5}, 1)
        return readings

    readings = _fork_measuring(child)
    (_, at_fork), (_, after_record) = readings
    limit = series_bytes // 10
    numbers = {
        step: {k: v[k] for k in ("Private_Dirty", "Private_Clean", "Shared_Dirty")}
        for step, v in readings
    }
    # Right after the fork the child has written (nearly) nothing...
    assert at_fork["Private_Dirty"] < limit, (series_bytes, numbers)
    # ...and recording into one series copies only that series' pages.
    assert after_record["Private_Dirty"] - at_fork["Private_Dirty"] < limit, (
        series_bytes,
        numbers,
    )
    # The parent's own series are intact.
    assert len(series_of(name)) == SERIES


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux smaps")
def test_a_snapshot_in_a_fork_child_writes_no_page_of_series_it_does_not_use(
    unique: Callable[..., str],
) -> None:
    name = unique()
    _, series_bytes = _many_series(name)

    def child() -> list[tuple[str, dict[str, int]]]:
        readings = [("fork", _memory())]
        assert [s for s in meterage.snapshot() if s.operation == name] == []
        readings.append(("snapshot", _memory()))
        return readings

    (_, at_fork), (_, after_snapshot) = _fork_measuring(child)
    limit = series_bytes // 10
    assert at_fork["Private_Dirty"] < limit, (series_bytes, at_fork["Private_Dirty"])
    growth = after_snapshot["Private_Dirty"] - at_fork["Private_Dirty"]
    assert growth < limit, (series_bytes, growth)


# 5. Data after a reset.


def test_meters_made_before_a_reset_count_from_zero_after_it(
    unique: Callable[..., str],
) -> None:
    name, decorated_name = unique("with"), unique("decorated")
    meter = meterage.meter(name, probes=())

    @meterage.meter(decorated_name, probes=())
    def work() -> None:
        pass

    for _ in range(3):
        with meter:
            pass
        work()
    meterage.reset()
    assert series_of(name) == [] and series_of(decorated_name) == []
    for _ in range(2):
        with meter:
            pass
        work()
    assert counts(name) == {"{}": 2}
    assert counts(decorated_name) == {"{}": 2}


def test_bound_handles_made_before_a_reset_record_into_visible_series(
    unique: Callable[..., str],
) -> None:
    histogram_name, counter_name = unique("h"), unique("c")
    bound_histogram = meterage.histogram(histogram_name).bind({"k": 1})
    bound_counter = meterage.counter(counter_name).bind({"k": 1})
    bound_histogram.record(7.0)
    bound_counter.add(3)
    meterage.reset()
    assert series_of(histogram_name) == [] and series_of(counter_name) == []
    bound_histogram.record(2.0)
    bound_counter.add(5)
    (h,) = series_of(histogram_name)
    assert (h.attributes, h.count) == ({"k": 1}, 1)
    snapshot = h.histograms[histogram_name]
    assert (snapshot.count, snapshot.sum, snapshot.min, snapshot.max) == (1, 2.0, 2.0, 2.0)
    (c,) = series_of(counter_name)
    assert (c.attributes, c.count, c.value) == ({"k": 1}, 1, 5.0)


def test_a_snapshot_right_after_reset_holds_only_calls_in_flight(
    unique: Callable[..., str], tracking: None
) -> None:
    done, flying = unique("done"), unique("flying")
    histogram = meterage.histogram(unique("h"))
    counter = meterage.counter(unique("c"))
    with meterage.meter(done, sample=1.0) as call:
        call.set_attribute("x", 1)
    histogram.record(1, attributes={"x": 1})
    histogram.record(2)
    counter.add(1)
    in_flight = InFlight(meterage.meter(flying, probes=()), 1)
    try:
        meterage.reset()
        names = {done, flying, histogram.name, counter.name}
        left = [s for s in meterage.snapshot() if s.operation in names]
        assert [(s.operation, s.count, s.active) for s in left] == [(flying, 0, 1)]
        assert left[0].histograms["duration"].count == 0
    finally:
        in_flight.release()
    assert [(s.count, s.active) for s in series_of(flying)] == [(1, 0)]


def test_reset_frees_the_series_nothing_holds(unique: Callable[..., str]) -> None:
    meterage.configure(cardinality_limit=5000)
    histogram = meterage.histogram(unique("h"))
    meter = meterage.meter(unique("op"), probes=())
    base = meterage._native.memory_bytes()
    held = []
    for round_ in range(8):
        for i in range(500):
            histogram.record(1.0, attributes={"round": round_, "i": i})
            with meter as call:
                call.set_attribute("i", round_ * 1000 + i)
        held.append(meterage._native.memory_bytes() - base)
        meterage.reset()
    # Each round's series are gone after its reset: memory does not grow round by round.
    assert held == [held[0]] * 8, held
    assert meterage._native.memory_bytes() <= base


# 6. Recording threads while another thread resets in a loop.


def test_recording_threads_and_a_resetting_thread_stay_consistent(
    unique: Callable[..., str], tracking: None
) -> None:
    names = [unique(label) for label in ("decorated", "with", "h", "c")]
    decorated_name, with_name, histogram_name, counter_name = names
    histogram = meterage.histogram(histogram_name)
    counter = meterage.counter(counter_name)
    bound = histogram.bind({"bound": True})
    bound_counter = counter.bind({"bound": True})
    meter = meterage.meter(with_name, probes=())

    @meterage.meter(decorated_name, sample=1.0)
    def work(i: int) -> int:
        return i * 2

    errors: list[BaseException] = []
    problems: list[str] = []
    stop = threading.Event()
    recorders, rounds = 3, 1500

    def record() -> None:
        try:
            for i in range(rounds):
                work(i)
                with meter as call:
                    call.set_attribute("i", i % 7)
                histogram.record(i % 100, attributes={"i": i % 5})
                bound.record(0 if i % 3 == 0 else 1e-3 * i)
                counter.add(1, attributes={"i": i % 5})
                bound_counter.add(0.5)
        except BaseException as error:  # reported by the test
            errors.append(error)

    def check() -> None:
        for series in meterage.snapshot():
            if series.operation not in names:
                continue
            if series.kind == "counter":
                if not series.value >= 0 or series.count < 0:
                    problems.append(f"counter {series.attributes}: {series.value}")
                continue
            if series.active is not None and not 0 <= series.active <= recorders:
                problems.append(f"{series.operation} active {series.active}")
            for measure, h in series.histograms.items():
                if h.count != sum(h.bucket_counts) + h.zero_count:
                    problems.append(
                        f"{series.operation} {measure}: count {h.count} != "
                        f"{sum(h.bucket_counts)} + {h.zero_count}"
                    )
            main = "duration" if series.kind == "call" else series.operation
            if series.count != series.histograms[main].count:
                problems.append(f"{series.operation}: count differs from its histogram")

    def reset_loop() -> None:
        try:
            while not stop.is_set():
                meterage.reset()
                check()
        except BaseException as error:  # reported by the test
            errors.append(error)

    resetter = threading.Thread(target=reset_loop)
    threads = [threading.Thread(target=record) for _ in range(recorders)]
    resetter.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    stop.set()
    resetter.join(120)
    assert errors == []
    assert problems == []
    check()
    assert problems == []
    # No call is left counted in flight, and calls in flight now are counted exactly.
    assert all(s.active in (None, 0) for s in meterage.snapshot() if s.operation in names)
    in_flight = InFlight(meter, 3)
    try:
        # Counted on the meter's own series (the calls have set no attributes yet).
        active = {repr(s.attributes): s.active for s in series_of(with_name)}
        assert active.pop("{}") == 3
        assert set(active.values()) <= {None, 0}, active
    finally:
        in_flight.release()
