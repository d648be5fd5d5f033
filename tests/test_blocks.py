"""A ``with``/``async with`` block of a meter owns the call it entered: wherever and in
whatever order its generator, task or context resumes, the block's end ends exactly its
own call.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import meterage


def series(operation: str) -> list[meterage.Series]:
    return [s for s in meterage.snapshot() if s.operation == operation]


def counts(operation: str) -> dict[tuple[tuple[str, Any], ...], int]:
    """Each series of ``operation`` (its attributes, sorted) -> its count."""
    return {tuple(sorted(s.attributes.items())): s.count for s in series(operation)}


def one(operation: str, **attributes: Any) -> meterage.Series:
    found = [s for s in series(operation) if s.attributes == attributes]
    assert len(found) == 1, f"{operation} {attributes}: {[s.attributes for s in series(operation)]}"
    return found[0]


def duration(operation: str, **attributes: Any) -> float:
    return one(operation, **attributes).histograms["duration"].sum


# --- 1. A generator whose block spans yields, resumed in other threads and contexts -------


def _next_in_new_thread(generator: Iterator[Any]) -> Any:
    outcome: list[tuple[bool, Any]] = []

    def step() -> None:
        try:
            outcome.append((True, next(generator)))
        except BaseException as error:  # handed back to the caller's thread
            outcome.append((False, error))

    thread = threading.Thread(target=step)
    thread.start()
    thread.join()
    (ok, value) = outcome[0]
    if not ok:
        raise value
    return value


def _next_in_copied_context(generator: Iterator[Any]) -> Any:
    return contextvars.copy_context().run(next, generator)


def _next_like_starlette(generator: Iterator[Any]) -> Any:
    """What Starlette does with a sync iterator: each step in anyio's worker threads (with
    the caller's context copied in); without anyio, the same by hand."""
    try:
        import anyio
        import anyio.to_thread
    except ImportError:
        with ThreadPoolExecutor(max_workers=2) as pool:
            return pool.submit(contextvars.copy_context().run, next, generator).result()

    end = object()  # as Starlette does: a StopIteration cannot leave a coroutine

    async def step() -> Any:
        return await anyio.to_thread.run_sync(next, generator, end)

    value = anyio.run(step)
    if value is end:
        raise StopIteration
    return value


RESUMERS = {
    "new_thread_per_step": _next_in_new_thread,
    "copied_context": _next_in_copied_context,
    "worker_thread_with_copied_context": _next_like_starlette,
}


@pytest.mark.parametrize("resume", list(RESUMERS))
def test_a_block_spanning_yields_survives_resumption_anywhere(
    unique: Callable[[str], str], resume: str
) -> None:
    # Before: RuntimeError "meter exited without a matching __enter__" at the step that
    # ends the block (the third here).
    operation = unique("stream")
    meter = meterage.meter(operation)

    def stream() -> Iterator[str]:
        with meter as call:
            call.set_attribute("route", "/items")
            yield "a"
            yield "b"
        yield "after"

    generator = stream()
    step = RESUMERS[resume]
    received = []
    while True:
        try:
            received.append(step(generator))
        except StopIteration:
            break
    assert received == ["a", "b", "after"]
    assert counts(operation) == {(("route", "/items"),): 1}


def test_a_generator_block_resumed_in_threads_records_its_real_duration(
    unique: Callable[[str], str],
) -> None:
    operation = unique("stream")
    meter = meterage.meter(operation)

    def stream() -> Iterator[int]:
        with meter:
            yield 1
            time.sleep(0.05)
            yield 2

    generator = stream()
    assert _next_in_new_thread(generator) == 1
    assert _next_in_new_thread(generator) == 2
    with pytest.raises(StopIteration):
        _next_in_new_thread(generator)
    assert one(operation).count == 1
    assert 0.045 <= duration(operation) < 2.0


def test_a_block_ended_on_another_thread_records_no_other_threads_counters(
    unique: Callable[[str], str],
) -> None:
    operation = unique("stream")
    meter = meterage.meter(operation, probes=("cpu", "io"), sample=1.0)
    # This thread writes 4 MB (outside any block) before the block ends here.
    descriptor = os.open(os.devnull, os.O_WRONLY)
    try:
        for _ in range(400):
            os.write(descriptor, b"x" * 10_000)
    finally:
        os.close(descriptor)

    def stream() -> Iterator[int]:
        with meter:
            yield 1
            time.sleep(0.05)  # no CPU, no IO inside the block
            yield 2

    generator = stream()
    assert _next_in_new_thread(generator) == 1  # entered on a fresh thread
    assert list(generator) == [2]  # ended on this one
    found = one(operation)
    assert found.count == 1
    written = found.histograms.get("io.write")
    assert (written.sum if written is not None else 0.0) == 0.0
    cpu = found.histograms.get("cpu.time")
    assert (cpu.sum if cpu is not None else 0.0) < 0.02


# --- 2. An async generator whose block spans yields, stepped by a new task per step -------


def test_an_async_generator_block_spanning_yields_stepped_by_new_tasks(
    unique: Callable[[str], str],
) -> None:
    operation = unique("events")
    meter = meterage.meter(operation)

    async def events() -> Any:
        async with meter as call:
            call.set_attribute("channel", "news")
            for n in range(3):
                await asyncio.sleep(0)
                yield n

    async def consume() -> list[int]:
        agen = events()
        received = []
        while True:
            try:
                received.append(await asyncio.wait_for(agen.__anext__(), 1))
            except StopAsyncIteration:
                return received

    assert asyncio.run(consume()) == [0, 1, 2]
    assert counts(operation) == {(("channel", "news"),): 1}


# --- 3. Blocks of one meter object ending out of order ------------------------------------


def test_interleaved_generator_blocks_keep_their_own_durations(
    unique: Callable[[str], str],
) -> None:
    # Before: the first exit ended the latest call, so a and b swapped durations.
    operation = unique("interleaved")
    meter = meterage.meter(operation)

    def worker(name: str) -> Iterator[None]:
        with meter as call:
            call.set_attribute("who", name)
            yield
        yield

    a, b = worker("a"), worker("b")
    next(a)  # A enters
    time.sleep(0.03)
    next(b)  # B enters
    next(a)  # A exits
    time.sleep(0.06)
    next(b)  # B exits
    assert counts(operation) == {(("who", "a"),): 1, (("who", "b"),): 1}
    assert 0.025 <= duration(operation, who="a") < 0.06
    assert 0.055 <= duration(operation, who="b") < 2.0


def test_exit_stacks_closed_in_opening_order_keep_each_calls_attributes(
    unique: Callable[[str], str],
) -> None:
    operation = unique("stacks")
    meter = meterage.meter(operation)

    @contextlib.contextmanager
    def metered(name: str) -> Iterator[meterage.Call]:
        with meter as call:
            call.set_attribute("who", name)
            yield call

    first, second = contextlib.ExitStack(), contextlib.ExitStack()
    first_call = first.enter_context(metered("first"))
    time.sleep(0.03)
    second_call = second.enter_context(metered("second"))
    first_call.set_attribute("late", 1)  # each handle is its own call
    second_call.set_attribute("late", 2)
    first.close()  # not LIFO: the first opened closes first
    time.sleep(0.06)
    second.close()
    assert counts(operation) == {
        (("late", 1), ("who", "first")): 1,
        (("late", 2), ("who", "second")): 1,
    }
    assert 0.025 <= duration(operation, who="first", late=1) < 0.06
    assert 0.055 <= duration(operation, who="second", late=2) < 2.0


def test_enter_context_on_the_meter_itself_nested_and_exited_lifo(
    unique: Callable[[str], str],
) -> None:
    operation = unique("direct")
    meter = meterage.meter(operation)
    with contextlib.ExitStack() as outer:
        level_1 = outer.enter_context(meter)
        level_1.set_attribute("level", 1)
        level_2 = outer.enter_context(meter)
        level_2.set_attribute("level", 2)
        with contextlib.ExitStack() as inner:
            level_3 = inner.enter_context(meter)
            level_3.set_attribute("level", 3)
        assert counts(operation) == {(("level", 3),): 1}
        assert isinstance(level_1, meterage.Call) and level_1 is not level_2
    assert counts(operation) == {(("level", 1),): 1, (("level", 2),): 1, (("level", 3),): 1}


def test_a_with_block_ending_before_an_exit_stack_entry_of_the_same_meter(
    unique: Callable[[str], str],
) -> None:
    # The with block ends first although the ExitStack entry was entered later; the
    # entry ends afterwards through the class-level __exit__ (the fallback stack).
    operation = unique("mixed")
    meter = meterage.meter(operation)
    stack = contextlib.ExitStack()
    with meter as block:
        block.set_attribute("who", "block")
        entry = stack.enter_context(meter)
        entry.set_attribute("who", "entry")
        time.sleep(0.02)
    time.sleep(0.05)
    stack.close()
    assert counts(operation) == {(("who", "block"),): 1, (("who", "entry"),): 1}
    assert 0.015 <= duration(operation, who="block") < 0.05
    assert 0.065 <= duration(operation, who="entry") < 2.0


# --- 4. Many threads and tasks at once ----------------------------------------------------


def test_with_blocks_in_16_threads_count_exactly(unique: Callable[[str], str]) -> None:
    operation = unique("threads")
    meter = meterage.meter(operation)
    start = threading.Barrier(16)

    def work(thread: int) -> None:
        start.wait()
        for _ in range(2000):
            with meter as call:
                call.set_attribute("thread", thread)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counts(operation) == {(("thread", n),): 2000 for n in range(16)}


def test_generator_blocks_handed_between_16_threads_count_exactly(
    unique: Callable[[str], str],
) -> None:
    # 16 threads at once enter 200 blocks each in generators and end; 16 other threads at
    # once resume those generators, each ending another thread's blocks.
    operation = unique("handoff")
    meter = meterage.meter(operation)

    def job(owner: int, n: int) -> Iterator[int]:
        with meter as call:
            call.set_attribute("owner", owner)
            finisher = yield n
            call.set_attribute("finisher", finisher)
        yield -1

    started: list[list[Iterator[int]]] = [[] for _ in range(16)]
    errors: list[BaseException] = []

    def run_all(target: Callable[[int], None]) -> None:
        barrier = threading.Barrier(16)

        def run(thread: int) -> None:
            try:
                barrier.wait()
                target(thread)
            except BaseException as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=run, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def enter(thread: int) -> None:
        for n in range(200):
            generator = job(thread, n)
            assert next(generator) == n
            started[thread].append(generator)

    def finish(thread: int) -> None:
        for generator in started[(thread + 1) % 16]:
            assert generator.send(thread) == -1

    try:
        run_all(enter)
        assert errors == []
        assert counts(operation) == {}
        run_all(finish)
        assert errors == []
    finally:
        # Close what a failure left open here, not in some later garbage collection.
        for generator in itertools.chain.from_iterable(started):
            with contextlib.suppress(Exception):
                generator.close()
        started.clear()
    assert counts(operation) == {(("finisher", n), ("owner", (n + 1) % 16)): 200 for n in range(16)}


def test_async_with_in_100_concurrent_tasks_counts_exactly(
    unique: Callable[[str], str],
) -> None:
    operation = unique("tasks")
    meter = meterage.meter(operation)

    async def task(n: int) -> int:
        async with meter as call:
            call.set_attribute("task", n)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        return n

    async def main() -> list[int]:
        return await asyncio.gather(*(task(n) for n in range(100)))

    assert asyncio.run(main()) == list(range(100))
    assert counts(operation) == {(("task", n),): 1 for n in range(100)}


def test_async_generator_blocks_of_100_tasks_stepped_by_new_tasks(
    unique: Callable[[str], str],
) -> None:
    operation = unique("agen_tasks")
    meter = meterage.meter(operation)

    async def events(n: int) -> Any:
        async with meter as call:
            call.set_attribute("task", n)
            yield n
            await asyncio.sleep(0)
            yield -n

    async def consume(n: int) -> list[int]:
        agen = events(n)
        received = []
        while True:
            try:
                received.append(await asyncio.wait_for(agen.__anext__(), 5))
            except StopAsyncIteration:
                return received

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(consume(n) for n in range(100)))

    assert asyncio.run(main()) == [[n, -n] for n in range(100)]
    assert counts(operation) == {(("task", n),): 1 for n in range(100)}


# --- 5. Cancellation and timeouts ---------------------------------------------------------


def test_a_cancelled_task_records_its_block_once_as_cancelled(
    unique: Callable[[str], str],
) -> None:
    operation = unique("cancel")
    meter = meterage.meter(operation)

    async def slow() -> None:
        async with meter:
            await asyncio.sleep(10)

    async def main() -> bool:
        task = asyncio.create_task(slow())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return task.cancelled()

    assert asyncio.run(main()) is True
    assert counts(operation) == {(("error.type", "CancelledError"),): 1}


def test_wait_for_timeout_reaches_the_caller_and_records_the_block_once(
    unique: Callable[[str], str],
) -> None:
    operation = unique("timeout")
    meter = meterage.meter(operation)
    times: dict[str, float] = {}

    async def slow() -> None:
        async with meter:
            times["entered"] = time.perf_counter()
            await asyncio.sleep(10)

    async def main() -> None:
        times["started"] = time.perf_counter()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(slow(), 0.02)
        times["left"] = time.perf_counter()

    asyncio.run(main())
    assert counts(operation) == {(("error.type", "CancelledError"),): 1}
    # The timeout counts from wait_for's start; the block from its task's first step,
    # which a busy machine may run late. The loop may fire a timer up to its clock
    # resolution (1 ms) early.
    late_start = times["entered"] - times["started"]
    recorded = duration(operation, **{"error.type": "CancelledError"})
    assert 0.02 - late_start - 0.002 <= recorded <= times["left"] - times["entered"] + 0.001


def test_cancelling_a_step_of_an_async_generator_block(unique: Callable[[str], str]) -> None:
    # The block was entered by an earlier step's task; the cancelled step's task ends it.
    operation = unique("agen_cancel")
    meter = meterage.meter(operation)

    async def events() -> Any:
        async with meter as call:
            call.set_attribute("k", "v")
            yield 1
            await asyncio.sleep(10)
            yield 2

    async def main() -> None:
        agen = events()
        assert await asyncio.wait_for(agen.__anext__(), 1) == 1
        step = asyncio.ensure_future(agen.__anext__())
        await asyncio.sleep(0.01)
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step

    asyncio.run(main())
    assert counts(operation) == {(("error.type", "CancelledError"), ("k", "v")): 1}


def test_wait_for_timeout_on_an_async_generator_step_reaches_the_caller(
    unique: Callable[[str], str],
) -> None:
    operation = unique("agen_timeout")
    meter = meterage.meter(operation)

    async def events() -> Any:
        async with meter:
            yield 1
            await asyncio.sleep(10)
            yield 2

    async def main() -> None:
        agen = events()
        assert await asyncio.wait_for(agen.__anext__(), 1) == 1
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(agen.__anext__(), 0.02)

    asyncio.run(main())
    assert counts(operation) == {(("error.type", "CancelledError"),): 1}


# --- 6. Exceptions pass through unchanged; an exit never suppresses -----------------------


def _frames(error: BaseException) -> list[str]:
    return [frame.name for frame in traceback.extract_tb(error.__traceback__)]


def test_an_exception_in_a_block_propagates_unchanged(unique: Callable[[str], str]) -> None:
    operation = unique("raise")
    meter = meterage.meter(operation)

    def failing(manager: Any, error: BaseException) -> None:
        with manager:
            raise error

    plain_error, metered_error = KeyError("plain"), KeyError("metered")
    with pytest.raises(KeyError) as plain:
        failing(contextlib.nullcontext(), plain_error)
    with pytest.raises(KeyError) as metered:
        failing(meter, metered_error)
    assert metered.value is metered_error
    assert _frames(metered.value) == _frames(plain.value)
    assert metered.value.__context__ is None and metered.value.__cause__ is None
    assert counts(operation) == {(("error.type", "KeyError"),): 1}


def test_an_exception_in_an_async_block_propagates_unchanged(
    unique: Callable[[str], str],
) -> None:
    operation = unique("araise")
    meter = meterage.meter(operation)

    class Failure(Exception):
        pass

    error = Failure("async")

    async def failing() -> None:
        async with meter as call:
            call.set_attribute("k", 1)
            await asyncio.sleep(0)
            raise error

    async def main() -> BaseException:
        try:
            await failing()
        except Failure as caught:
            return caught
        raise AssertionError("no exception")

    caught = asyncio.run(main())
    assert caught is error
    assert _frames(caught)[-1] == "failing"
    assert caught.__context__ is None
    qualname = Failure.__qualname__
    assert counts(operation) == {(("error.type", qualname), ("k", 1)): 1}


def test_an_exception_in_a_generator_block_resumed_in_a_thread_propagates_unchanged(
    unique: Callable[[str], str],
) -> None:
    # Before: the block's exit raised RuntimeError on the other thread, replacing it.
    operation = unique("thread_raise")
    meter = meterage.meter(operation)
    error = LookupError("from the block")

    def stream() -> Iterator[int]:
        with meter:
            yield 1
            raise error

    generator = stream()
    assert next(generator) == 1
    with pytest.raises(LookupError) as raised:
        _next_in_new_thread(generator)
    assert raised.value is error
    assert raised.value.__context__ is None
    assert _frames(raised.value)[-1] == "stream"
    assert counts(operation) == {(("error.type", "LookupError"),): 1}


def test_a_blocks_exit_never_suppresses(unique: Callable[[str], str]) -> None:
    operation = unique("no_suppress")
    meter = meterage.meter(operation)
    error = ValueError("kept")
    exit_handle = meter.__exit__
    meter.__enter__()
    assert exit_handle(ValueError, error, None) is False
    meter.__enter__()
    assert type(meter).__exit__(meter, ValueError, error, None) is False

    async def main() -> tuple[Any, Any]:
        async_exit = meter.__aexit__
        await meter.__aenter__()
        first = await async_exit(ValueError, error, None)
        await meter.__aenter__()
        second = await type(meter).__aexit__(meter, ValueError, error, None)
        return first, second

    first, second = asyncio.run(main())
    assert first is False and second is False
    assert counts(operation) == {(("error.type", "ValueError"),): 4}


# --- 7. Calling __exit__ by hand ----------------------------------------------------------


def test_exit_without_enter_raises_runtime_error(unique: Callable[[str], str]) -> None:
    meter = meterage.meter(unique("unmatched"))
    with pytest.raises(RuntimeError, match="without a matching __enter__"):
        meter.__exit__(None, None, None)
    with pytest.raises(RuntimeError, match="without a matching __enter__"):
        type(meter).__exit__(meter, None, None, None)
    assert series(meter.name) == []


def test_enter_then_class_level_exit_ends_that_call(unique: Callable[[str], str]) -> None:
    operation = unique("class_exit")
    meter = meterage.meter(operation)
    call = meter.__enter__()
    call.set_attribute("by", "hand")
    assert counts(operation) == {}
    assert type(meter).__exit__(meter, None, None, None) is False
    assert counts(operation) == {(("by", "hand"),): 1}
    with pytest.raises(RuntimeError, match="without a matching __enter__"):
        type(meter).__exit__(meter, None, None, None)


def test_exit_handles_looked_up_before_enter_end_their_own_calls(
    unique: Callable[[str], str],
) -> None:
    # PEP 343's expansion by hand: `exit = mgr.__exit__; value = mgr.__enter__()`.
    operation = unique("pep343")
    meter = meterage.meter(operation)
    exit_a = meter.__exit__
    meter.__enter__().set_attribute("who", "a")
    exit_b = meter.__exit__
    meter.__enter__().set_attribute("who", "b")
    time.sleep(0.02)
    assert exit_a(None, None, None) is False  # a ends first, though b entered last
    time.sleep(0.05)
    assert exit_b(None, None, None) is False
    assert counts(operation) == {(("who", "a"),): 1, (("who", "b"),): 1}
    assert 0.015 <= duration(operation, who="a") < 0.05
    assert 0.065 <= duration(operation, who="b") < 2.0
    with pytest.raises(RuntimeError, match="already ended"):
        exit_a(None, None, None)
    assert counts(operation) == {(("who", "a"),): 1, (("who", "b"),): 1}
