"""meterage.integrations.celery under a real Celery worker (prefork pool, multiprocess mode)
with a real redis-server as broker and result backend.

The tasks are sent by a client process of their own (which stamps each message's
publication time) while no worker runs; the worker starts ``DELAY`` seconds later, so that
every task waited at least that long. Its pool processes are replaced every 3 tasks, and the
group's numbers are read by a task (any member's snapshot is the group's) and from the
worker's Prometheus endpoint. Checked against truth: the counts by status are exact, each
task's queue wait is its start (as a task_prerun receiver of the app's own saw it) less the
time the client was about to send it (within ``WAIT_TOLERANCE``: the steps from there to
the stamp, and from meterage's prerun receiver to the app's), a task that burns
``BURN_NS`` of thread CPU is charged that (+10% and Celery's own cost of a trivial task),
the output sizes add up exactly, and the depth of a queue nobody consumes is its exact
length.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import servers

servers.require_modules("celery", "redis", "opentelemetry.exporter.prometheus")

#: How long the tasks wait, at least, before the worker starts.
DELAY = 1.5
#: What each jobs.burn task spends of its thread's CPU.
BURN_NS = 30_000_000
#: Per task: from the client's clock read to the stamp, and between the two prerun receivers.
WAIT_TOLERANCE = 0.02
SIZES = [0, 1, 1000, 4096, 65536, 123457]
BURNS = 4
FAILS = 3
#: Attempts that fail, per jobs.flaky task (2 retries at most: the last one fails for good).
FLAKY = [1, 2, 3]
HELD = 5


@pytest.fixture
def redis() -> Iterator[servers.Redis]:
    with servers.redis_server() as server:
        yield server


def environment(redis: servers.Redis, metrics_port: int) -> dict[str, str]:
    env = servers.worker_environment(
        export="configure",
        service_name="meterage-jobs-celery",
        metrics_port=metrics_port,
        otlp=None,
        multiprocess=True,
        JOBS_BURN_NS=str(BURN_NS),
    )
    return servers.celery_environment(redis, env)


def client(env: dict[str, str], *args: str) -> Any:
    finished = servers.run_to_exit(
        "celery-client",
        [servers.PYTHON, str(servers.APPS / "jobs_celery_client.py"), *args],
        env=env,
        timeout=90,
    )
    assert finished.returncode == 0, finished.report()
    return finished.result()


def rows(report: dict[str, Any], name: str, status: str, **attributes: Any) -> list[Any]:
    return [
        row
        for row in report["calls"]
        if row["attributes"]["meterage.job.name"] == name
        and row["attributes"]["meterage.job.status"] == status
        and all(row["attributes"].get(key) == value for key, value in attributes.items())
    ]


def values(report: dict[str, Any], metric: str, name: str, status: str) -> list[Any]:
    return [
        row
        for row in report["values"]
        if row["name"] == metric
        and row["attributes"]["meterage.job.name"] == name
        and row["attributes"]["meterage.job.status"] == status
    ]


@pytest.mark.multiprocess_mode
def test_celery_prefork_jobs_by_status_with_queue_wait_cpu_output_and_depth(redis) -> None:
    plan: list[list[Any]] = [["jobs.ok", [index, size], None] for index, size in enumerate(SIZES)]
    plan += [["jobs.burn", [index], None] for index in range(BURNS)]
    plan += [["jobs.fail", [index], None] for index in range(FAILS)]
    plan += [["jobs.flaky", [failures], None] for failures in FLAKY]
    plan += [["jobs.ok", [index, 1], "held"] for index in range(HELD)]
    metrics_port = servers.free_port()
    env = environment(redis, metrics_port)
    sent = client(env, "send", json.dumps(plan))
    sent_at = {task_id: before for task_id, before in sent}
    consumed = [
        (task_id, name, args)
        for (task_id, _), (name, args, queue) in zip(sent, plan, strict=True)
        if not queue
    ]
    ids = [task_id for task_id, _, _ in consumed]
    time.sleep(DELAY)
    with servers.celery_worker(
        "jobs_celery_app", redis=redis, env=env, concurrency=2, max_tasks_per_child=3
    ) as worker:
        results = client(env, "wait", *ids)
        ((report_id, _),) = client(env, "send", json.dumps([["jobs.report", [], None]]))
        (report,) = client(env, "wait", report_id)
        samples = servers.scrape(metrics_port)
        assert worker.alive()
    assert report["multiprocess"] and report["pid"] != worker.process.pid

    # Counts by status, exact.
    (ok,) = rows(report, "jobs.ok", "succeeded")
    assert ok["count"] == ok["sampled"] == len(SIZES)
    assert ok["attributes"] == {
        "messaging.system": "celery",
        "messaging.destination.name": "celery",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "meterage.job.name": "jobs.ok",
        "meterage.job.status": "succeeded",
    }
    (failed,) = rows(report, "jobs.fail", "failed")
    assert failed["count"] == FAILS and failed["attributes"]["error.type"] == "KeyError"
    (flaky_ok,) = rows(report, "jobs.flaky", "succeeded")
    assert flaky_ok["count"] == sum(1 for f in FLAKY if f <= 2)
    (flaky_retried,) = rows(report, "jobs.flaky", "retried")
    assert flaky_retried["count"] == sum(min(f, 2) for f in FLAKY)
    assert flaky_retried["attributes"]["error.type"] == "ConnectionError"
    (flaky_failed,) = rows(report, "jobs.flaky", "failed")
    assert flaky_failed["count"] == sum(1 for f in FLAKY if f > 2)
    assert flaky_failed["attributes"]["error.type"] == "ConnectionError"
    assert not rows(report, "jobs.ok", "failed") and not rows(report, "jobs.burn", "failed")
    assert [result is None for result in results] == [
        name == "jobs.fail" or (name == "jobs.flaky" and args[0] > 2) for _, name, args in consumed
    ]

    # Queue wait: every task waited for the worker, each as long as it really did.
    expected = [
        started - sent_at[task_id]
        for (task_id, name, _), started in zip(consumed, results, strict=True)
        if name == "jobs.ok"
    ]
    (wait,) = values(report, "job.queue.wait", "jobs.ok", "succeeded")
    assert wait["count"] == len(SIZES)
    assert wait["min"] >= DELAY
    assert abs(wait["sum"] - sum(expected)) <= WAIT_TOLERANCE * len(SIZES), (wait, expected)
    assert min(expected) - WAIT_TOLERANCE <= wait["min"] <= wait["max"] <= max(expected)
    # The retried attempts were published again (by the worker) and waited anew.
    (retry_wait,) = values(report, "job.queue.wait", "jobs.flaky", "retried")
    assert retry_wait["count"] == flaky_retried["count"]

    # CPU: each burning task is charged what it burned, not its neighbours' work.
    (burned,) = rows(report, "jobs.burn", "succeeded")
    assert burned["count"] == burned["sampled"] == BURNS
    cpu = burned["histograms"]["cpu.time"]
    assert cpu["count"] == BURNS
    # Beyond the burn, a task's call holds Celery's own work around the function in its
    # pool process, which a loaded host makes several times dearer: bounded by the
    # costliest jobs.ok task of the same run (the same work around a trivial body) + 10%.
    framework = ok["histograms"]["cpu.time"]["max"]
    assert BURN_NS * 1e-9 <= cpu["min"], cpu
    assert cpu["max"] <= 1.1 * BURN_NS * 1e-9 + framework, (cpu, framework)

    # Output sizes, exact; only the jobs that reported one have one.
    (output,) = values(report, "job.output.size", "jobs.ok", "succeeded")
    assert (output["count"], output["sum"]) == (len(SIZES), sum(SIZES))
    assert not values(report, "job.output.size", "jobs.burn", "succeeded")

    # The group's one exporter: the same counts, and the held queue's depth.
    status_of = {"meterage_operation": "messaging.process", "meterage_job_name": "jobs.flaky"}
    count = "meterage_call_duration_seconds_count"
    assert servers.sample_total(samples, count, **status_of, meterage_job_status="retried") == 5
    assert servers.sample_total(samples, count, meterage_job_name="jobs.ok") == len(SIZES)
    assert servers.sample_total(samples, "job_queue_depth", messaging_system="celery") == HELD
    # The worker's own queue is drained (redis deletes an empty list: its depth is 0).
    depths = [
        (labels["messaging_destination_name"], value)
        for name, labels, value in samples
        if name == "job_queue_depth"
    ]
    assert sorted(depths) == [("celery", 0.0), ("held", float(HELD))]
    # Every attempt of every task had its wait measured.
    attempts = len(SIZES) + BURNS + FAILS + len(FLAKY) + flaky_retried["count"]
    waits = "job_queue_wait_seconds_count"
    names = ("jobs.ok", "jobs.burn", "jobs.fail", "jobs.flaky")
    assert sum(servers.sample_total(samples, waits, meterage_job_name=n) for n in names) == attempts
    assert os.getpid() not in report["members"]


def test_instrument_and_queue_depth_refuse_bad_arguments() -> None:
    """Checked in the caller's process before anything is connected or patched."""
    import meterage.integrations.celery as integration

    with pytest.raises(TypeError, match="app must be a Celery application"):
        integration.instrument("tasks")
    with pytest.raises(ValueError, match="sample"):
        integration.instrument(sample=2.0)
    with pytest.raises(TypeError, match="probes"):
        integration.instrument(probes="cpu")
    with pytest.raises(ValueError, match="not both"):
        integration.instrument(sample=0.5, budget=0.1)
    with pytest.raises(TypeError, match="queue must be a non-empty str"):
        integration.queue_depth(None, "")
    assert not integration._connected
