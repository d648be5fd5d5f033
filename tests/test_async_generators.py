"""Coroutines, generators and async generators: they stay what they are, a call lasts the
object's lifetime, and the probes add up only the object's own steps (not the consumer's,
not other tasks')."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import time

import pytest

import meterage


class Boom(Exception):
    pass


def cpu_meter(name):
    return meterage.meter(name, probes=("cpu",), sample=1.0)


# ---- kinds are kept ----------------------------------------------------------------------------


def test_decorated_kinds_stay_what_they_are(unique):
    async def coroutine_function(x):
        """Coroutine doc."""
        return x

    def generator_function(n):
        yield from range(n)

    async def async_generator_function(n):
        for i in range(n):
            yield i

    for original, check in [
        (coroutine_function, inspect.iscoroutinefunction),
        (generator_function, inspect.isgeneratorfunction),
        (async_generator_function, inspect.isasyncgenfunction),
    ]:
        for metered in (meterage.meter(original), meterage.meter(unique())(original)):
            assert check(metered), original
            assert metered.__name__ == original.__name__
            assert metered.__qualname__ == original.__qualname__
            assert metered.__doc__ == original.__doc__
            assert metered.__wrapped__ is original
            assert inspect.signature(metered) == inspect.signature(original)
    assert asyncio.iscoroutinefunction(meterage.meter(coroutine_function))
    assert not inspect.iscoroutinefunction(meterage.meter(generator_function))


def test_bare_decorator_on_async_def_names_the_operation(one_series):
    @meterage.meter
    async def fetch(x):
        await asyncio.sleep(0)
        return x + 1

    assert asyncio.run(fetch(1)) == 2
    assert one_series(fetch.__qualname__).count == 1


# ---- coroutines ---------------------------------------------------------------------------------


def test_coroutine_result_and_one_call(unique, one_series):
    name = unique()

    @meterage.meter(name, sample=1.0)
    async def work(x):
        for _ in range(3):
            await asyncio.sleep(0)
        return x * 2

    async def main():
        coroutine = work(21)
        # Creating the coroutine runs nothing: no call yet.
        assert meterage.snapshot() == []
        return await coroutine

    assert asyncio.run(main()) == 42
    series = one_series(name)
    assert series.count == 1
    assert series.sampled == 1


def test_coroutine_error_propagates_unchanged(unique, one_series):
    name = unique()
    error = Boom("async")

    @meterage.meter(name)
    async def fail():
        await asyncio.sleep(0)
        raise error

    async def main():
        with pytest.raises(Boom) as info:
            await fail()
        return info.value

    assert asyncio.run(main()) is error
    assert one_series(name).attributes == {"error.type": "Boom"}


def test_cancelled_coroutine_is_recorded_as_cancelled(unique, one_series):
    name = unique()

    @meterage.meter(name)
    async def slow():
        await asyncio.sleep(10)

    async def main():
        task = asyncio.create_task(slow())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert one_series(name, {"error.type": "CancelledError"}).count == 1


def test_concurrent_tasks_are_charged_only_their_own_cpu(unique, one_series, burn):
    sleeper_name, worker_name = unique("sleeper"), unique("worker")
    busy_steps = []

    @cpu_meter(sleeper_name)
    async def sleeper():
        for _ in range(4):
            await asyncio.sleep(0.01)

    @cpu_meter(worker_name)
    async def worker():
        for _ in range(10):
            busy_steps.append(burn(3_000_000))  # 3 ms of CPU, then let others run
            await asyncio.sleep(0)

    async def main():
        await asyncio.gather(sleeper(), worker())

    asyncio.run(main())
    worker_busy = sum(busy_steps) / 1e9  # ~30 ms
    sleeper_series = one_series(sleeper_name)
    worker_series = one_series(worker_name)
    sleeper_cpu = sleeper_series.histograms["cpu.time"].sum
    worker_cpu = worker_series.histograms["cpu.time"].sum
    # The worker busy-loops while the sleeper is suspended on the same thread: the sleeper's
    # thread CPU clock advances by the worker's 30 ms, but only its own steps (a few
    # scheduling calls) count. A tenth of the worker's busy time is a very loose bound.
    assert sleeper_cpu < 0.1 * worker_busy, (sleeper_cpu, worker_busy)
    # The worker is charged its own busy loops (at least), plus its own small step overheads
    # (allow 0.2 ms per step for the awaits' bookkeeping).
    assert worker_busy - 10 * 5e-6 <= worker_cpu <= worker_busy + 11 * 0.2e-3, (
        worker_cpu,
        worker_busy,
    )
    # Wall time runs from the first step to the end, waits and others' steps included.
    assert sleeper_series.histograms["duration"].sum >= 0.04
    assert worker_series.histograms["duration"].sum >= worker_busy


def test_same_meter_used_by_concurrent_tasks(unique, series_of):
    name = unique()
    m = meterage.meter(name)

    async def job(i):
        async with m as call:
            call.set_attribute("job", i)
            await asyncio.sleep(0.001 * (3 - i))

    async def main():
        await asyncio.gather(*(job(i) for i in range(3)))

    asyncio.run(main())
    # Each task finds its own active call (context variables), however the exits interleave.
    assert sorted(s.attributes["job"] for s in series_of(name)) == [0, 1, 2]
    assert all(s.count == 1 for s in series_of(name))


def test_coroutine_awaiting_a_future(unique, one_series):
    name = unique()
    began = []

    @meterage.meter(name)
    async def wait_for(future):
        began.append(time.monotonic())
        return await future

    async def main():
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        loop.call_later(0.005, lambda: future.set_result(time.monotonic()))
        return await wait_for(future)

    resolved = asyncio.run(main())
    # The call spans its wait: from before its first statement to after the future was
    # resolved (compared with the future's own times, not the 5 ms asked for, since a
    # preempted thread may start waiting late).
    assert one_series(name).histograms["duration"].min >= resolved - began[0]
    assert resolved - began[0] > 0


# ---- generators ----------------------------------------------------------------------------------


def test_generator_is_one_call_over_its_lifetime(unique, one_series):
    name = unique()

    @meterage.meter(name, sample=1.0)
    def count_up(n):
        yield from range(n)

    generator = count_up(5)
    assert inspect.isgenerator(generator)
    assert meterage.snapshot() == []  # created, not started
    assert next(generator) == 0
    assert next(generator) == 1
    assert meterage.snapshot() == []  # started, not finished
    assert list(generator) == [2, 3, 4]
    series = one_series(name)
    assert series.count == 1
    assert series.attributes == {}
    assert list(count_up(3)) == [0, 1, 2]
    assert one_series(name).count == 2


def test_generator_cpu_is_its_own_steps_not_the_consumers(unique, one_series, burn):
    name = unique()
    own = []

    @cpu_meter(name)
    def produce():
        for i in range(5):
            own.append(burn(300_000))  # 0.3 ms in each of the generator's own steps
            yield i

    consumer = 0
    for _ in produce():
        consumer += burn(3_000_000)  # the consumer busy-loops 3 ms between next() calls
    series = one_series(name)
    cpu = series.histograms["cpu.time"]
    own_total = sum(own) / 1e9  # ~1.5 ms
    assert cpu.count == 1
    # Charged its own 1.5 ms (at least) plus small step overheads (0.2 ms per step), never
    # the consumer's 15 ms.
    assert own_total - 6 * 5e-6 <= cpu.sum <= own_total + 6 * 0.2e-3, (cpu.sum, own_total)
    # Wall time covers the generator's whole lifetime, consumer included.
    assert series.histograms["duration"].sum >= (own_total + consumer / 1e9) * 0.99


def test_generator_send_and_return_value(unique, one_series):
    name = unique()

    @meterage.meter(name)
    def accumulate():
        total = 0
        while True:
            value = yield total
            if value is None:
                return total
            total += value

    generator = accumulate()
    assert next(generator) == 0
    assert generator.send(5) == 5
    assert generator.send(10) == 15
    with pytest.raises(StopIteration) as info:
        generator.send(None)
    assert info.value.value == 15
    assert one_series(name).count == 1

    def delegate():
        return (yield from accumulate())

    outer = delegate()
    next(outer)
    outer.send(2)
    with pytest.raises(StopIteration) as info:
        outer.send(None)
    assert info.value.value == 2
    assert one_series(name).count == 2


def test_generator_early_break_and_close_are_calls_not_errors(unique, series_of):
    name = unique()
    cleaned = []

    @meterage.meter(name)
    def items():
        try:
            yield from range(100)
        finally:
            cleaned.append(True)

    for item in items():
        if item == 3:
            break
    generator = items()
    next(generator)
    generator.close()
    assert cleaned == [True, True]
    (series,) = series_of(name)
    assert series.attributes == {}
    assert series.count == 2


def test_generator_never_started_is_not_a_call(unique):
    name = unique()

    @meterage.meter(name)
    def items():
        yield 1

    generator = items()
    generator.close()
    del generator
    assert meterage.snapshot() == []


def test_exception_thrown_into_a_generator(unique, series_of, one_series):
    name = unique()

    @meterage.meter(name)
    def resilient():
        while True:
            try:
                yield "ready"
            except KeyError:
                yield "handled"

    generator = resilient()
    assert next(generator) == "ready"
    # Caught inside: the generator carries on and nothing is recorded yet.
    assert generator.throw(KeyError("k")) == "handled"
    assert meterage.snapshot() == []
    error = Boom("thrown")
    with pytest.raises(Boom) as info:
        generator.throw(error)
    assert info.value is error
    (series,) = series_of(name)
    assert series.attributes == {"error.type": "Boom"}
    assert series.count == 1


def test_generator_raising_on_its_own(unique, one_series):
    name = unique()
    error = ValueError("bad item")

    @meterage.meter(name)
    def faulty():
        yield 1
        raise error

    generator = faulty()
    assert next(generator) == 1
    with pytest.raises(ValueError) as info:
        next(generator)
    assert info.value is error
    assert one_series(name).attributes == {"error.type": "ValueError"}


# ---- async generators -----------------------------------------------------------------------


def test_async_generator_is_one_call_over_its_lifetime(unique, one_series):
    name = unique()

    @meterage.meter(name, sample=1.0)
    async def ticks(n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    async def main():
        generator = ticks(4)
        assert inspect.isasyncgen(generator)
        first = await generator.__anext__()
        assert meterage.snapshot() == []
        rest = [item async for item in generator]
        return [first, *rest]

    assert asyncio.run(main()) == [0, 1, 2, 3]
    assert one_series(name).count == 1


def test_async_generator_cpu_excludes_consumer_and_other_tasks(unique, one_series, burn):
    name = unique()
    own = []
    others = []

    @cpu_meter(name)
    async def produce():
        for i in range(4):
            own.append(burn(300_000))  # 0.3 ms of its own per step
            await asyncio.sleep(0.002)  # meanwhile another task burns CPU
            yield i

    async def hog():
        for _ in range(8):
            others.append(burn(2_000_000))
            await asyncio.sleep(0)

    async def consume():
        consumer = 0
        async for _ in produce():
            consumer += burn(2_000_000)  # the consumer's own work between items
        return consumer

    async def main():
        consumer, _ = await asyncio.gather(consume(), hog())
        return consumer

    consumer = asyncio.run(main())
    own_total = sum(own) / 1e9
    foreign = (consumer + sum(others)) / 1e9  # ~24 ms not belonging to the generator
    cpu = one_series(name).histograms["cpu.time"]
    assert cpu.count == 1
    # Own 1.2 ms plus per-step overheads (0.2 ms per step, 5 asends); none of the 24 ms.
    assert own_total - 10 * 5e-6 <= cpu.sum <= own_total + 10 * 0.2e-3, (cpu.sum, own_total)
    assert cpu.sum < 0.5 * foreign


def test_async_generator_early_close(unique, series_of):
    name = unique()
    cleaned = []

    @meterage.meter(name)
    async def items():
        try:
            for i in range(100):
                yield i
        finally:
            cleaned.append(True)

    async def main():
        generator = items()
        async for item in generator:
            if item == 2:
                break
        await generator.aclose()

    asyncio.run(main())
    assert cleaned == [True]
    (series,) = series_of(name)
    assert series.attributes == {}
    assert series.count == 1


def test_async_generator_never_started_is_not_a_call(unique):
    name = unique()

    @meterage.meter(name)
    async def items():
        yield 1

    async def main():
        await items().aclose()

    asyncio.run(main())
    assert meterage.snapshot() == []


def test_exception_thrown_into_an_async_generator(unique, series_of):
    name = unique()

    @meterage.meter(name)
    async def resilient():
        while True:
            try:
                yield "ready"
            except KeyError:
                yield "handled"

    error = Boom("athrow")

    async def main():
        generator = resilient()
        assert await generator.__anext__() == "ready"
        assert await generator.athrow(KeyError("k")) == "handled"
        assert meterage.snapshot() == []
        with pytest.raises(Boom) as info:
            await generator.athrow(error)
        return info.value

    assert asyncio.run(main()) is error
    (series,) = series_of(name)
    assert series.attributes == {"error.type": "Boom"}
    assert series.count == 1


def test_async_generator_asend_and_error(unique, series_of):
    name = unique()
    error = ValueError("too big")

    @meterage.meter(name)
    async def doubler():
        value = 0
        while True:
            value = yield value * 2
            if value > 10:
                raise error

    async def main():
        generator = doubler()
        assert await generator.__anext__() == 0
        assert await generator.asend(3) == 6
        with pytest.raises(ValueError) as info:
            await generator.asend(11)
        return info.value

    assert asyncio.run(main()) is error
    (series,) = series_of(name)
    assert series.attributes == {"error.type": "ValueError"}


def test_metered_coroutine_inside_a_metered_coroutine(unique, one_series):
    outer_name, inner_name = unique("outer"), unique("inner")

    @meterage.meter(inner_name)
    async def inner(x):
        await asyncio.sleep(0)
        return x

    @meterage.meter(outer_name)
    async def outer():
        return [await inner(i) for i in range(3)]

    assert asyncio.run(outer()) == [0, 1, 2]
    assert one_series(outer_name).count == 1
    assert one_series(inner_name).count == 3


def test_functools_partial_of_a_metered_coroutine(unique, one_series):
    name = unique()

    @meterage.meter(name)
    async def add(a, b):
        return a + b

    assert asyncio.run(functools.partial(add, 1)(2)) == 3
    assert one_series(name).count == 1


# ---- exact IO per object: own steps only ----------------------------------------------------


@pytest.fixture
def sink(tmp_path):
    fd = os.open(tmp_path / "sink", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    yield lambda size: os.write(fd, b"w" * size)
    os.close(fd)


def io_meter(name):
    return meterage.meter(name, probes=("io",), sample=1.0)


def test_generator_io_is_exactly_its_own_steps(unique, one_series, sink):
    name = unique()

    @io_meter(name)
    def produce():
        for size in (100, 2000, 30):
            sink(size)
            yield size
        sink(7)  # the last step, ending in StopIteration

    for _ in produce():
        sink(50_000)  # the consumer's writes between steps are not the generator's
    assert one_series(name).histograms["io.write"].sum == 100 + 2000 + 30 + 7


def test_coroutine_io_excludes_other_tasks(unique, one_series, sink):
    name = unique()

    @io_meter(name)
    async def own():
        for size in (10, 20, 30):
            sink(size)
            await asyncio.sleep(0.001)

    async def noisy():
        for _ in range(10):
            sink(10_000)
            await asyncio.sleep(0.0005)

    async def main():
        await asyncio.gather(own(), noisy())

    asyncio.run(main())
    assert one_series(name).histograms["io.write"].sum == 60


def test_async_generator_io_is_exactly_its_own_steps(unique, one_series, sink):
    name = unique()

    @io_meter(name)
    async def produce():
        for size in (1, 22, 333):
            sink(size)
            await asyncio.sleep(0)
            yield size

    async def noisy():
        for _ in range(5):
            sink(9_999)
            await asyncio.sleep(0)

    async def consume():
        async for _ in produce():
            sink(4_444)

    async def main():
        await asyncio.gather(consume(), noisy())

    asyncio.run(main())
    assert one_series(name).histograms["io.write"].sum == 356
