"""meterage.jobs, the generic job API for hand-rolled workers: decorated functions and
coroutines, with blocks and jobs a worker starts and ends itself, in threads and asyncio,
checked against truth (exact counts by status, queue waits against the enqueue times
given, each job charged the thread CPU it burned and none of its neighbours'), and its
errors for bad input, each naming the argument."""

from __future__ import annotations

import asyncio
import datetime
import functools
import inspect
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import meterage
import meterage.jobs as jobs

#: CPU each burning job spends (thread CPU, the cpu probe's clock).
BURN_NS = 10_000_000
#: A job is charged its own burn plus meterage's and Python's few µs.
CPU_SLACK = 1.1
#: What each job burns where threads contend for the GIL: the handoffs cost the job's own
#: threads CPU outside the burns, 0.6-1 ms per job of 20 ms with six threads here, up to
#: 3.4 ms (the same without meterage: thread_time around the same work), so over 10% at
#: times (CI: charged 22.13 ms for 20 ms burned).
CONTENDED_BURN_NS = 3 * BURN_NS


def job_series(name: str, status: str | None = None) -> list[meterage.Series]:
    return [
        s
        for s in meterage.snapshot()
        if s.kind == "call"
        and s.operation == jobs.OPERATION
        and s.attributes.get(jobs.JOB_NAME) == name
        and (status is None or s.attributes.get(jobs.STATUS) == status)
    ]


def one(name: str, status: str) -> meterage.Series:
    found = job_series(name, status)
    assert len(found) == 1, (name, status, [s.attributes for s in job_series(name)])
    return found[0]


def counts(name: str) -> dict[tuple[str, str | None], int]:
    return {
        (s.attributes[jobs.STATUS], s.attributes.get("error.type")): s.count
        for s in job_series(name)
    }


def values_of(histogram: meterage.Histogram, series: meterage.Series) -> meterage.HistogramSnapshot:
    """A job value histogram in the series of the same attributes as the job's calls."""
    return histogram.snapshot(series.attributes)


def check_cpu(series: meterage.Series, jobs_count: int, burned_ns: int) -> None:
    cpu = series.histograms["cpu.time"]
    assert series.sampled == cpu.count == jobs_count
    assert burned_ns * 1e-9 <= cpu.min and cpu.max <= CPU_SLACK * burned_ns * 1e-9, (
        cpu.min,
        cpu.max,
    )


@pytest.fixture(autouse=True)
def _no_tracking_left_on():
    """The tests that attach meterage to a provider leave calls in flight tracked (attach
    switches it on for good): off again, so later tests' snapshots have no empty series."""
    yield
    meterage._native.set_active_tracking(False)


# --- decorated functions ------------------------------------------------------------------


def test_a_decorated_function_is_a_job_per_call_with_its_attributes_and_status(unique) -> None:
    name = unique("send")

    @jobs.job(name, queue="email", system="threads", attributes={"tier": "gold"}, probes=())
    def send(to: str, *, fail: bool = False) -> str:
        """Sends one email."""
        if fail:
            raise ConnectionError(to)
        return to.upper()

    assert send.__name__ == "send" and send.__doc__ == "Sends one email."
    assert str(inspect.signature(send)) == "(to: 'str', *, fail: 'bool' = False) -> 'str'"
    assert [send("a"), send("b")] == ["A", "B"]
    with pytest.raises(ConnectionError) as raised:
        send("c", fail=True)
    assert raised.value.args == ("c",)
    assert counts(name) == {("succeeded", None): 2, ("failed", "ConnectionError"): 1}
    assert one(name, "succeeded").attributes == {
        "messaging.system": "threads",
        "messaging.destination.name": "email",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "meterage.job.name": name,
        "meterage.job.status": "succeeded",
        "tier": "gold",
    }


def test_a_bare_decorator_names_the_job_after_the_function() -> None:
    @jobs.job
    def reindex() -> int:
        return 1

    assert reindex() == 1
    assert one(reindex.__qualname__, "succeeded").count == 1
    assert reindex.__qualname__.endswith("<locals>.reindex")


def test_queue_wait_and_output_are_recorded_in_the_jobs_own_series(unique) -> None:
    name = unique("resize")

    @jobs.job(name, queue="images", probes=(), enqueued_at=lambda item: item["enqueued"])
    def resize(item: dict[str, Any]) -> None:
        jobs.report_output(item["size"])
        jobs.report_output(1)  # reports add up
        if item["size"] == 0:
            raise ValueError("empty")

    waits = [0.25, 1.5, 3.0]
    before = time.time()
    for size, wait in zip((10, 20, 0), waits, strict=True):
        with pytest.raises(ValueError) if size == 0 else _nothing():
            resize({"enqueued": before - wait, "size": size})
    elapsed = time.time() - before
    ok, failed = one(name, "succeeded"), one(name, "failed")
    ok_wait = values_of(jobs.queue_wait(), ok)
    assert ok_wait.count == 2 and ok_wait.unit == "s"
    assert sum(waits[:2]) <= ok_wait.sum <= sum(waits[:2]) + 2 * elapsed
    failed_wait = values_of(jobs.queue_wait(), failed)
    assert failed.attributes["error.type"] == "ValueError"
    assert failed_wait.count == 1 and waits[2] <= failed_wait.sum <= waits[2] + elapsed
    output = values_of(jobs.output_size(), ok)
    assert (output.count, output.sum, output.unit) == (2, 32.0, "By")
    assert values_of(jobs.output_size(), failed).sum == 1.0


def test_a_decorated_job_runs_whatever_enqueue_time_its_message_gives(unique, caplog) -> None:
    """The enqueue time comes with each message: one without it, NaN, or a producer's
    clock far ahead leaves that job's queue wait unknown (logged once), never the job
    unrun; a good one after them is recorded."""
    name = unique("skewed")
    ran: list[int] = []

    @jobs.job(name, queue="mail", probes=(), enqueued_at=lambda message: message["sent"])
    def send(message: dict[str, Any]) -> int:
        ran.append(message["n"])
        return message["n"] * 2

    now = time.time()
    messages = [
        {"n": 1, "sent": now + 5.0},  # 5 s ahead: past the clock skew allowed
        {"n": 2, "sent": float("nan")},
        {"n": 3},  # no enqueue time at all
        {"n": 4, "sent": "yesterday"},
        {"n": 5, "sent": now - 2.0},
    ]
    with caplog.at_level(logging.WARNING, logger="meterage.jobs"):
        assert [send(message) for message in messages] == [2, 4, 6, 8, 10]
    assert ran == [1, 2, 3, 4, 5]
    (series,) = job_series(name, "succeeded")
    assert series.count == 5
    wait = values_of(jobs.queue_wait(), series)
    assert wait.count == 1 and 2.0 <= wait.sum <= 2.0 + (time.time() - now)
    warned = [r.getMessage() for r in caplog.records if r.name == "meterage.jobs"]
    assert len(warned) == 1 and name in warned[0] and "in the future" in warned[0]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


def test_a_job_without_an_enqueue_time_or_output_has_no_such_values(unique) -> None:
    name = unique("plain")
    jobs.job(name, probes=())(lambda: None)()
    series = one(name, "succeeded")
    assert values_of(jobs.queue_wait(), series).count == 0
    assert values_of(jobs.output_size(), series).count == 0


def test_threads_each_job_is_charged_its_own_cpu_and_its_thread_pool_work(
    unique, burn, collector_off
) -> None:
    name = unique("threads")
    pool = ThreadPoolExecutor(2)
    burn_ns = CONTENDED_BURN_NS

    @jobs.job(name, system="threads", probes=("cpu",), sample=1.0)
    def work() -> None:
        burn(burn_ns)
        # Handed to a pool: charged to the job (the pool's threads are shared by all).
        pool.submit(burn, burn_ns).result()

    workers = [threading.Thread(target=lambda: [work() for _ in range(3)]) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    pool.shutdown()
    series = one(name, "succeeded")
    assert series.count == 12
    check_cpu(series, 12, 2 * burn_ns)


def test_asyncio_coroutine_jobs_are_charged_their_own_steps(unique, burn, collector_off) -> None:
    name = unique("asyncio")

    @jobs.job(name, queue="urls", system="asyncio", probes=("cpu",), sample=1.0)
    async def fetch(index: int) -> int:
        for _ in range(3):
            burn(CONTENDED_BURN_NS // 3)
            await asyncio.sleep(0.001)  # the others run meanwhile: not charged to this one
        await asyncio.to_thread(burn, CONTENDED_BURN_NS)
        await asyncio.create_task(_burn_async(burn))
        return index

    async def main() -> list[int]:
        return await asyncio.gather(*(fetch(i) for i in range(6)))

    assert inspect.iscoroutinefunction(fetch)
    assert asyncio.run(main()) == list(range(6))
    series = one(name, "succeeded")
    assert series.count == 6
    check_cpu(series, 6, 3 * (CONTENDED_BURN_NS // 3) + 2 * CONTENDED_BURN_NS)


async def _burn_async(burn: Any) -> None:
    burn(CONTENDED_BURN_NS)


def test_a_cancelled_coroutine_job_failed_with_cancelled_error(unique) -> None:
    name = unique("cancelled")
    started = asyncio.Event()

    @jobs.job(name, system="asyncio", probes=())
    async def slow() -> None:
        started.set()
        await asyncio.sleep(30)

    async def main() -> None:
        task = asyncio.create_task(slow())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert counts(name) == {("failed", "CancelledError"): 1}


def test_retry_marks_the_job_to_end_as_retried(unique) -> None:
    name = unique("retry")

    @jobs.job(name, probes=())
    def attempt(how: str) -> None:
        job = jobs.current()
        assert job is not None and job.name == name and not job.ended
        if how == "marked":
            job.retry(TimeoutError("later"))  # then returns: still retried
        elif how == "raise":
            job.retry()
            raise ConnectionResetError  # the retry's error.type is what it raised
        elif how == "plain":
            job.retry()
        elif how == "string":
            job.retry("RateLimited")

    for how in ("marked", "raise", "plain", "string", "ok"):
        with pytest.raises(ConnectionResetError) if how == "raise" else _nothing():
            attempt(how)
    assert counts(name) == {
        ("retried", "TimeoutError"): 1,
        ("retried", "ConnectionResetError"): 1,
        ("retried", None): 1,
        ("retried", "RateLimited"): 1,
        ("succeeded", None): 1,
    }


def test_current_is_the_job_in_its_tasks_and_thread_pool_work(unique) -> None:
    name = unique("current")
    seen: list[Any] = []

    @jobs.job(name, probes=("cpu",), sample=1.0)
    async def job_body() -> None:
        seen.append(jobs.current())
        await asyncio.create_task(_note(seen))
        await asyncio.get_running_loop().run_in_executor(None, lambda: seen.append(jobs.current()))
        assert jobs.report_output(5) is True

    asyncio.run(job_body())
    assert len(seen) == 3 and seen[0] is not None and seen[0].name == name
    assert all(job is seen[0] for job in seen)
    assert seen[0].status == "succeeded" and jobs.current() is None
    assert values_of(jobs.output_size(), one(name, "succeeded")).sum == 5


async def _note(seen: list[Any]) -> None:
    seen.append(jobs.current())


# --- with blocks --------------------------------------------------------------------------


def test_a_with_block_is_one_job(unique, burn, collector_off) -> None:
    name = unique("block")
    enqueued = time.time() - 2.0
    with jobs.job(name, queue="batch", enqueued_at=enqueued, probes=("cpu",), sample=1.0) as job:
        burned = burn(BURN_NS)
        job.report_output(100)
        assert jobs.current() is job and job.call is None
        assert meterage.current_call() is None  # a block's call is not an OpenCall
    assert job.status == "succeeded" and job.queue_wait is not None
    series = one(name, "succeeded")
    check_cpu(series, 1, burned)
    wait = values_of(jobs.queue_wait(), series)
    assert wait.count == 1 and 2.0 <= wait.sum <= time.time() - enqueued
    assert values_of(jobs.output_size(), series).sum == 100


def test_with_blocks_fail_retry_and_nest(unique) -> None:
    name, inner = unique("outer"), unique("inner")
    with pytest.raises(KeyError):
        with jobs.job(name, probes=(), enqueued_at=datetime.datetime.now(datetime.timezone.utc)):
            raise KeyError("x")
    with jobs.job(name, probes=()) as job:
        job.retry(OSError)
    outer = jobs.job(name, probes=())
    with outer as first:
        with jobs.job(inner, probes=()) as second:
            assert jobs.current() is second
        assert jobs.current() is first
        with outer as again:  # the same meter, nested: each block ends its own job
            assert jobs.current() is again
        assert jobs.current() is first and again.ended and not first.ended
    assert jobs.current() is None
    assert counts(name) == {
        ("failed", "KeyError"): 1,
        ("retried", "OSError"): 1,
        ("succeeded", None): 2,
    }
    assert counts(inner) == {("succeeded", None): 1}
    failed = one(name, "failed")
    assert values_of(jobs.queue_wait(), failed).count == 1  # in the failure's series


def test_a_with_block_inside_a_decorated_job_is_the_current_one_until_it_ends(unique) -> None:
    name, block = unique("outer"), unique("block")

    @jobs.job(name, probes=())
    def outer() -> None:
        mine = jobs.current()
        with jobs.job(block, probes=()) as inner:
            assert jobs.current() is inner
        assert jobs.current() is mine and meterage.current_call() is mine.call

    outer()
    assert one(name, "succeeded").count == one(block, "succeeded").count == 1


# --- jobs a worker starts and ends --------------------------------------------------------


def test_start_run_and_end(unique, burn, collector_off) -> None:
    name = unique("started")
    enqueued = time.time() - 1.0
    job = jobs.start(
        name, queue="q", system="mine", enqueued_at=enqueued, probes=("cpu",), sample=1
    )
    assert job.queue_wait is not None and 1.0 <= job.queue_wait <= time.time() - enqueued
    assert job.attributes[jobs.DESTINATION] == "q" and job.status is None
    with ThreadPoolExecutor(1) as pool:
        burned = job.run(lambda: burn(BURN_NS) + pool.submit(burn, BURN_NS).result())
    job.set_attribute("shard", 3)
    job.end()
    job.end(KeyError)  # a second end does nothing
    assert job.ended and job.status == "succeeded"
    series = one(name, "succeeded")
    assert series.count == 1 and series.attributes["shard"] == 3
    check_cpu(series, 1, burned)
    assert values_of(jobs.queue_wait(), series).sum == pytest.approx(job.queue_wait, abs=1e-6)
    with pytest.raises(RuntimeError, match="has ended"):
        job.report_output(1)
    with pytest.raises(RuntimeError, match="has ended"):
        job.retry()


def test_started_coroutine_steps_and_errors(unique) -> None:
    name = unique("steps")

    async def body(fail: bool) -> int:
        await asyncio.sleep(0)
        assert jobs.current() is not None
        if fail:
            raise LookupError
        return 1

    async def worker(fail: bool) -> None:
        job = jobs.start(name, probes=())
        try:
            await job.steps(body(fail))
        except LookupError as error:
            job.end(error)
        else:
            job.end()

    asyncio.run(worker(False))
    asyncio.run(worker(True))
    assert counts(name) == {("succeeded", None): 1, ("failed", "LookupError"): 1}


def test_active_jobs_are_the_calls_in_flight(unique) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import meterage.otel

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=False)
    try:
        name = unique("active")
        running = [jobs.start(name, queue="q", probes=()) for _ in range(3)]
        (series,) = [s for s in meterage.snapshot() if s.attributes.get(jobs.JOB_NAME) == name]
        assert series.active == 3
        for job in running[:2]:
            job.end()
        data = reader.get_metrics_data()
        points = {
            metric.name: [
                p for p in metric.data.data_points if p.attributes.get(jobs.JOB_NAME) == name
            ]
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
        }
        (active,) = points["meterage.calls.active"]
        assert active.value == 1 and active.attributes["meterage.operation"] == jobs.OPERATION
        # The meter's own series holds the job in flight (no status yet, no calls).
        done = {p.attributes.get(jobs.STATUS): p.count for p in points["meterage.call.duration"]}
        assert done == {None: 0, "succeeded": 2}
        running[2].end("Timeout")
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()


# --- queue depth -----------------------------------------------------------------------


def test_queue_depths_are_read_when_collected_and_exported(unique, caplog) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import meterage.otel

    queue = unique("queue")
    waiting = ["a", "b", "c"]
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=False)

    def exported() -> dict[str, float]:
        found: dict[str, float] = {}
        data = reader.get_metrics_data()
        for rm in data.resource_metrics if data is not None else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == jobs.QUEUE_DEPTH:
                        assert sm.scope.name == "meterage" and metric.unit == "{job}"
                        for point in metric.data.data_points:
                            found[point.attributes[jobs.DESTINATION]] = point.value
        return found

    registrations = []
    try:
        registrations.append(jobs.queue_depth(queue, lambda: len(waiting), system="mine"))
        assert jobs.read_queue_depths()[("mine", queue)] == 3.0
        assert exported()[queue] == 3
        waiting.append("d")
        assert exported()[queue] == 4  # read at each collection
        # Registered again: the new callback replaces the first.
        registrations.append(jobs.queue_depth(queue, lambda: 9, system="mine"))
        assert exported()[queue] == 9
        assert registrations[0].remove() is False
        # A callback that raises or gives no number exports nothing, logged once.
        broken = unique("broken")
        registrations.append(jobs.queue_depth(broken, lambda: 1 / 0))
        registrations.append(jobs.queue_depth(unique("nan"), lambda: float("nan")))
        registrations.append(jobs.queue_depth(unique("none"), lambda: None))
        with caplog.at_level(logging.WARNING, logger="meterage.jobs"):
            for _ in range(3):
                found = exported()
        assert set(found) == {queue}
        messages = [r.getMessage() for r in caplog.records if r.name == "meterage.jobs"]
        assert len(messages) == 2 and "raised" in messages[0] and "nan" in messages[1]
        assert registrations[1].remove() is True
        assert queue not in exported()
        meterage.otel.detach(provider)
        registrations.append(jobs.queue_depth(queue, lambda: 1))
        assert exported() == {}  # detached: nothing of meterage's
    finally:
        for registration in registrations:
            registration.remove()
        meterage.otel.detach(provider)
        provider.shutdown()


def test_a_queue_depth_registered_before_the_global_provider_is_set_is_exported() -> None:
    """The gauge goes through the OpenTelemetry API's proxy to the provider made global
    later (meterage.otel.configure() does that): in a fresh interpreter, since the global
    provider can be set only once."""
    pytest.importorskip("opentelemetry.sdk")
    script = """
import meterage.jobs
meterage.jobs.queue_depth("early", lambda: 7, system="mine")
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
import meterage.otel
meterage.otel.attach()
print(sorted(
    (p.attributes["messaging.destination.name"], p.value)
    for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
    for m in sm.metrics if m.name == "job.queue.depth" for p in m.data.data_points
))
"""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environment.pop("METERAGE_MULTIPROCESS", None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[('early', 7)]"  # an int stays an int


# --- the export ---------------------------------------------------------------------------


def test_jobs_export_with_their_attributes_in_every_metric(unique) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import meterage.otel

    name = unique("exported")
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=False)
    try:
        with jobs.job(
            name, queue="q", system="mine", enqueued_at=time.time() - 1, probes=("cpu",), sample=1.0
        ):
            jobs.report_output(42)
        by_metric: dict[str, list[Any]] = {}
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    for point in metric.data.data_points:
                        if point.attributes.get(jobs.JOB_NAME) == name:
                            by_metric.setdefault(metric.name, []).append(point)
        expected = {**jobs.attributes_of(name, queue="q", system="mine"), jobs.STATUS: "succeeded"}
        (duration,) = by_metric["meterage.call.duration"]
        assert dict(duration.attributes) == {**expected, "meterage.operation": jobs.OPERATION}
        (cpu,) = by_metric["meterage.call.cpu.time"]
        assert cpu.count == 1
        (wait,) = by_metric[jobs.QUEUE_WAIT]
        assert dict(wait.attributes) == expected and wait.count == 1 and wait.sum >= 1
        (output,) = by_metric[jobs.OUTPUT_SIZE]
        assert dict(output.attributes) == expected and output.sum == 42
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()


def test_the_duration_of_jobs_is_also_messaging_process_duration(unique) -> None:
    """The bridge exports the duration of operation messaging.process calls also as the
    semantic conventions' messaging.process.duration (where it has that alias)."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import meterage.otel
    from meterage.otel import _names

    aliases = getattr(_names, "ALIASES", {})
    if not any(a.name == "messaging.process.duration" for a in aliases.get(jobs.OPERATION, ())):
        pytest.skip("this build's bridge has no messaging.process.duration alias")
    name = unique("alias")
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=False)
    try:
        jobs.job(name, queue="q", system="mine", probes=())(lambda: None)()
        points = [
            point
            for rm in reader.get_metrics_data().resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == "messaging.process.duration"
            for point in metric.data.data_points
            if point.attributes.get(jobs.JOB_NAME) == name
        ]
        assert [p.count for p in points] == [1]
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()


# --- bad input ----------------------------------------------------------------------------


def raises(kind: type[Exception], words: str, call: Any) -> None:
    with pytest.raises(kind) as raised:
        call()
    assert words in str(raised.value), str(raised.value)


def test_bad_names_queues_systems_and_attributes_are_refused(unique) -> None:
    raises(TypeError, "name must be a non-empty str", lambda: jobs.start(None))
    raises(ValueError, "name must not be empty", lambda: jobs.start(""))
    raises(TypeError, "name must be", lambda: jobs.job(3))
    raises(TypeError, "queue must be a non-empty str or None", lambda: jobs.start("a", queue=5))
    raises(ValueError, "queue must not be empty", lambda: jobs.job("a", queue=""))
    raises(TypeError, "system must be", lambda: jobs.start("a", system=b"x"))
    raises(ValueError, "'meterage.job.status'", lambda: jobs.start("a", attributes={STATUS: "x"}))
    raises(ValueError, "'messaging.system'", lambda: jobs.job("a", attributes={SYSTEM: "x"}))
    raises(TypeError, "attributes must be a mapping", lambda: jobs.start("a", attributes=[1]))
    raises(TypeError, "probes", lambda: jobs.start("a", probes=3))
    raises(ValueError, "sample", lambda: jobs.job("a", sample=2.0))
    raises(TypeError, "probe must be True or False", lambda: jobs.start("a", probe="yes"))
    assert not job_series("a")  # nothing started


STATUS, SYSTEM = jobs.STATUS, jobs.SYSTEM


def test_bad_enqueue_times_are_refused_naming_the_argument() -> None:
    now = time.time()
    raises(ValueError, "enqueued_at is 60.0", lambda: jobs.start("a", enqueued_at=now + 60))
    raises(ValueError, "in the future", lambda: jobs.job("a", enqueued_at=now + 60).__enter__())
    raises(ValueError, "enqueued_at must be finite", lambda: jobs.start("a", enqueued_at=math_nan))
    raises(ValueError, "finite", lambda: jobs.job("a", enqueued_at=float("inf")))
    raises(TypeError, "enqueued_at must be time.time()", lambda: jobs.start("a", enqueued_at="1"))
    raises(TypeError, "not bool", lambda: jobs.start("a", enqueued_at=True))
    raises(
        ValueError, "naive datetime", lambda: jobs.start("a", enqueued_at=datetime.datetime.now())
    )
    raises(ValueError, "monotonic", lambda: jobs.start("a", enqueued_at=time.monotonic()))
    future = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    raises(ValueError, "in the future", lambda: jobs.start("a", enqueued_at=future))

    assert not job_series("a")  # nothing started
    # A decorated job's time comes with its message, at its call: the job runs all the same
    # (its wait unknown, logged), as it would unmetered.
    decorated = jobs.job("a", enqueued_at=lambda: now + 3600, probes=())(lambda: "ran")
    assert decorated() == "ran"
    assert [s.count for s in job_series("a")] == [1]
    # A clock a little ahead (another machine's): a wait of 0.
    job = jobs.start("a", enqueued_at=time.time() + jobs.MAX_CLOCK_SKEW / 2, probes=())
    assert job.queue_wait == 0.0
    job.end()


math_nan = float("nan")


def test_bad_uses_of_the_decorator_and_blocks_are_refused() -> None:
    raises(
        TypeError, "a function of its arguments", lambda: jobs.job("a", enqueued_at=1e9 + 1)(len)
    )

    def generator() -> Any:
        yield 1

    async def agenerator() -> Any:
        yield 1

    raises(TypeError, "not a generator function", lambda: jobs.job("a")(generator))
    raises(TypeError, "not a generator function", lambda: jobs.job("a")(agenerator))
    raises(TypeError, "not type", lambda: jobs.job("a")(int))
    raises(
        TypeError, "a with block takes", lambda: jobs.job("a", enqueued_at=time.time).__enter__()
    )
    raises(RuntimeError, "never began", lambda: jobs.job("a").__exit__(None, None, None))
    with jobs.job("a", probes=()) as job:
        raises(RuntimeError, "the block ends it", job.end)
        coroutine = asyncio.sleep(0)
        raises(TypeError, "cannot meter coroutine steps", lambda: job.steps(coroutine))
        coroutine.close()
        raises(TypeError, "error must be an exception", lambda: job.retry(42))
        raises(ValueError, "empty str", lambda: job.retry(""))
    started = jobs.start("a", probes=())
    raises(TypeError, "error must be an exception", lambda: started.end(42))
    assert not started.ended  # still open: it can be ended right
    started.end(KeyError)
    assert counts("a")[("failed", "KeyError")] == 1


def test_bad_output_sizes_are_refused() -> None:
    assert jobs.report_output(3) is False  # no job here: nothing recorded
    raises(TypeError, "nbytes must be an int", lambda: jobs.report_output(1.5))
    with jobs.job("a", probes=()) as job:
        raises(TypeError, "nbytes must be an int", lambda: job.report_output(True))
        raises(ValueError, "nbytes must be >= 0", lambda: jobs.report_output(-1))
    raises(TypeError, "callback must be a function", lambda: jobs.queue_depth("q", 3))
    raises(TypeError, "queue must be", lambda: jobs.queue_depth(None, len))


def test_a_job_that_is_never_ended_stays_in_flight_and_records_nothing(unique) -> None:
    name = unique("open")
    job = jobs.start(name, probes=())
    assert not job.ended and repr(job).endswith("running>")
    assert [s.count for s in job_series(name)] in ([], [0])
    job.end()
    assert one(name, "succeeded").count == 1


def test_a_metered_job_keeps_functools_behaviour() -> None:
    def base(a: int, b: int = 2) -> int:
        return a + b

    wrapped = jobs.job("wraps", probes=())(base)
    assert wrapped.__wrapped__ is base and functools.partial(wrapped, 1)() == 3
