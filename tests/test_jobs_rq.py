"""meterage.integrations.rq under real RQ workers with a real redis-server: the default
forking ``Worker`` (a work horse forked per job, ended with ``os._exit``) in multiprocess
mode, as ``--worker-class meterage.integrations.rq.MeteredWorker``, and RQ's own
``SimpleWorker`` with ``instrument()`` in its settings module.

The jobs are enqueued while no worker runs, and the worker starts ``DELAY`` seconds later,
so every job waited at least that long. The group's numbers are read by a job (any
member's snapshot is the group's) and from the worker's Prometheus endpoint, and checked
against truth: the counts by status are exact (jobs that raise with retries left, or return
``rq.Retry``, are retried; the rest fail), each job's queue wait is exactly RQ's record of
it (``started_at`` less ``enqueued_at``, to the microsecond), a job that burns ``BURN_NS``
of thread CPU is charged that (+10% and what RQ spends on a trivial job), the output sizes
add up exactly, and the depth of a queue no worker listens on is its exact length.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import servers

servers.require_modules("rq", "redis", "opentelemetry.exporter.prometheus")

import redis as redis_client  # noqa: E402
import rq  # noqa: E402

DELAY = 1.5
BURN_NS = 30_000_000
SIZES = [0, 1, 1000, 4096, 65536, 123457]
BURNS = 3
FAILS = 2
RETRIES = 2
#: Attempts that fail, per flaky job (RETRIES retries at most: 3 fails for good).
FLAKY = [1, 3]
HELD = 4


@pytest.fixture
def redis() -> Iterator[servers.Redis]:
    with servers.redis_server() as server:
        yield server


@contextlib.contextmanager
def queues(redis: servers.Redis) -> Iterator[tuple[rq.Queue, rq.Queue]]:
    connection = redis_client.Redis.from_url(redis.url())
    try:
        yield rq.Queue("default", connection=connection), rq.Queue("held", connection=connection)
    finally:
        connection.close()


def environment(redis: servers.Redis, metrics_port: int, **extra: str) -> dict[str, str]:
    return servers.worker_environment(
        export="none",
        service_name="meterage-jobs-rq",
        metrics_port=metrics_port,
        otlp=None,
        multiprocess=extra.pop("multiprocess", "1") == "1",
        PYTHONPATH=servers.python_path(servers.APPS),
        REDIS_URL=redis.url(),
        JOBS_BURN_NS=str(BURN_NS),
        **extra,
    )


def enqueue(queue: rq.Queue, held: rq.Queue) -> dict[str, list[rq.job.Job]]:
    jobs = {
        "ok": [queue.enqueue("jobs_rq.ok", index, size) for index, size in enumerate(SIZES)],
        "burn": [queue.enqueue("jobs_rq.burn", index) for index in range(BURNS)],
        "fail": [queue.enqueue("jobs_rq.fail", index) for index in range(FAILS)],
        "flaky": [
            queue.enqueue("jobs_rq.flaky", failures, RETRIES, retry=rq.Retry(max=RETRIES))
            for failures in FLAKY
        ],
        "flaky_return": [
            queue.enqueue("jobs_rq.flaky_return", failures, RETRIES) for failures in FLAKY
        ],
    }
    for index in range(HELD):
        held.enqueue("jobs_rq.ok", index, 1)
    return jobs


def wait_until_done(jobs: list[rq.job.Job], worker: servers.Server) -> None:
    def done() -> bool:
        return all(job.get_status(refresh=True) in ("finished", "failed") for job in jobs)

    servers.wait_for(done, what=f"{len(jobs)} RQ jobs done", timeout=60, servers=[worker])


def report_of(queue: rq.Queue, worker: servers.Server) -> dict[str, Any]:
    job = queue.enqueue("jobs_rq.report")
    wait_until_done([job], worker)
    report = job.return_value(refresh=True)
    assert isinstance(report, dict), job.latest_result()
    return report


def row(report: dict[str, Any], name: str, status: str) -> dict[str, Any]:
    (found,) = [
        r
        for r in report["calls"]
        if r["attributes"]["meterage.job.name"] == name
        and r["attributes"]["meterage.job.status"] == status
    ]
    return found


def value(report: dict[str, Any], metric: str, name: str, status: str) -> dict[str, Any]:
    (found,) = [
        r
        for r in report["values"]
        if r["name"] == metric
        and r["attributes"]["meterage.job.name"] == name
        and r["attributes"]["meterage.job.status"] == status
    ]
    return found


def check(report: dict[str, Any], jobs: dict[str, list[rq.job.Job]]) -> None:
    """The report against what RQ recorded of the jobs."""
    ok = row(report, "jobs_rq.ok", "succeeded")
    assert ok["count"] == ok["sampled"] == len(SIZES)
    assert ok["attributes"] == {
        "messaging.system": "rq",
        "messaging.destination.name": "default",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "meterage.job.name": "jobs_rq.ok",
        "meterage.job.status": "succeeded",
    }
    failed = row(report, "jobs_rq.fail", "failed")
    assert failed["count"] == FAILS and failed["attributes"]["error.type"] == "KeyError"
    for name, error in (("jobs_rq.flaky", "ConnectionError"), ("jobs_rq.flaky_return", "Retry")):
        retried = row(report, name, "retried")
        assert retried["count"] == sum(min(f, RETRIES) for f in FLAKY), name
        assert retried["attributes"].get("error.type") == (
            "ConnectionError" if name == "jobs_rq.flaky" else None
        )
        assert row(report, name, "succeeded")["count"] == sum(1 for f in FLAKY if f <= RETRIES)
        gave_up = row(report, name, "failed")
        assert gave_up["count"] == sum(1 for f in FLAKY if f > RETRIES)
        assert gave_up["attributes"]["error.type"] == error
    statuses = [job.get_status(refresh=True) for job in jobs["flaky"] + jobs["flaky_return"]]
    assert statuses == ["finished" if f <= RETRIES else "failed" for f in FLAKY] * 2

    # Queue wait: RQ's own record of each job, started_at less enqueued_at (RQ keeps
    # both to the microsecond), which is before the job's body began.
    wait = value(report, "job.queue.wait", "jobs_rq.ok", "succeeded")
    assert wait["count"] == len(SIZES) and wait["min"] >= DELAY
    for job in jobs["ok"]:
        job.refresh()
    recorded = [(job.started_at - job.enqueued_at).total_seconds() for job in jobs["ok"]]
    body = [job.return_value() - job.enqueued_at.timestamp() for job in jobs["ok"]]
    assert abs(wait["sum"] - sum(recorded)) <= 1e-6 * len(SIZES), (wait, recorded)
    assert abs(wait["min"] - min(recorded)) <= 1e-6 and abs(wait["max"] - max(recorded)) <= 1e-6
    assert all(r <= b for r, b in zip(recorded, body, strict=True)), (recorded, body)

    cpu = row(report, "jobs_rq.burn", "succeeded")["histograms"]["cpu.time"]
    assert cpu["count"] == BURNS
    # The job's call also holds RQ's own work around the function in its process (in a
    # forked work horse: up to 11% of the 30 ms burn on CI's 3.13 wheel suite): bounded by
    # the costliest jobs_rq.ok job of the same run (the same work around a trivial body)
    # + 10%.
    framework = row(report, "jobs_rq.ok", "succeeded")["histograms"]["cpu.time"]["max"]
    assert BURN_NS * 1e-9 <= cpu["min"], cpu
    assert cpu["max"] <= 1.1 * BURN_NS * 1e-9 + framework, (cpu, framework)

    output = value(report, "job.output.size", "jobs_rq.ok", "succeeded")
    assert (output["count"], output["sum"]) == (len(SIZES), sum(SIZES))


def check_export(samples: list[Any]) -> None:
    count = "meterage_call_duration_seconds_count"
    ok = {"meterage_operation": "messaging.process", "meterage_job_name": "jobs_rq.ok"}
    assert servers.sample_total(samples, count, **ok, meterage_job_status="succeeded") == len(SIZES)
    assert servers.sample_total(
        samples, count, meterage_job_name="jobs_rq.flaky", meterage_job_status="retried"
    ) == sum(min(f, RETRIES) for f in FLAKY)
    depth = {"messaging_destination_name": "held", "messaging_system": "rq"}
    assert servers.sample_total(samples, "job_queue_depth", **depth) == HELD
    # The jobs' histograms carry the jobs' attributes (no meterage.operation: not calls).
    output = {"meterage_job_name": "jobs_rq.ok", "meterage_job_status": "succeeded"}
    assert servers.sample_total(samples, "job_output_size_bytes_sum", **output) == sum(SIZES)
    assert servers.sample_total(samples, "job_queue_wait_seconds_count", **output) == len(SIZES)


@pytest.mark.multiprocess_mode
def test_rq_forking_worker_jobs_by_status_with_queue_wait_cpu_output_and_depth(redis) -> None:
    """MeteredWorker forks a work horse per job: each meters its job and exits; with
    METERAGE_MULTIPROCESS=1 the worker's group holds every horse's jobs."""
    metrics_port = servers.free_port()
    env = environment(redis, metrics_port)
    with queues(redis) as (queue, held):
        jobs = enqueue(queue, held)
        time.sleep(DELAY)
        with servers.rq_worker(
            redis,
            settings="jobs_rq_settings",
            worker_class="meterage.integrations.rq.MeteredWorker",
            env=env,
        ) as worker:
            wait_until_done([job for group in jobs.values() for job in group], worker)
            report = report_of(queue, worker)
            samples = servers.scrape(metrics_port)
        assert report["multiprocess"] and report["pid"] != worker.process.pid
        check(report, jobs)
        check_export(samples)
        assert held.count == HELD


def test_rq_simple_worker_with_instrument_in_its_settings(redis) -> None:
    """RQ's own SimpleWorker runs the jobs in its process; instrument() in the settings
    module meters them (no multiprocess mode needed)."""
    metrics_port = servers.free_port()
    env = environment(redis, metrics_port, multiprocess="0", JOBS_RQ_SAMPLE="1.0")
    with queues(redis) as (queue, held):
        jobs = enqueue(queue, held)
        time.sleep(DELAY)
        with servers.rq_worker(
            redis, settings="jobs_rq_settings", worker_class="rq.SimpleWorker", env=env
        ) as worker:
            wait_until_done([job for group in jobs.values() for job in group], worker)
            report = report_of(queue, worker)
            samples = servers.scrape(metrics_port)
        assert not report["multiprocess"] and report["pid"] == worker.process.pid
        check(report, jobs)
        check_export(samples)


def test_instrument_and_queue_depth_refuse_bad_arguments() -> None:
    """Checked before anything is patched."""
    import meterage.integrations.rq as integration

    perform = rq.job.Job.perform
    with pytest.raises(ValueError, match="sample"):
        integration.instrument(sample=0.0)
    with pytest.raises(TypeError, match="budget"):
        integration.instrument(budget="1%")
    with pytest.raises(TypeError, match=r"queue must be an rq\.Queue"):
        integration.queue_depth("default")
    assert rq.job.Job.perform is perform
