"""Job runners, the real ones: RQ's default forking ``Worker``, Celery's prefork pool (both
with a redis-server of the test's own as broker) and ``multiprocessing.Pool``.

The job (tests/workers_apps/workers_job.py) is one metered call with the cpu and io probes
on every call: it burns a little CPU and moves exactly ``PAYLOAD`` bytes through a pipe
each way, so N jobs are N calls, N CPU readings and N * PAYLOAD bytes read and written.

The tests marked ``MULTIPROCESS`` need issue 11's multiprocess mode: the calls of every
process of the group (RQ's work horses, forked per job and ended with ``os._exit``;
Celery's pool processes, replaced after a few tasks; a pool's workers, ended by
``terminate``) reach the group's one Prometheus endpoint and its one OTLP pusher. They are
strict xfails until it lands. The others pass today and prove the harness: the runners
start, each job runs metered in a child process, with exact CPU and IO counts.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from servers import (
    APPS,
    PUSH_INTERVAL_S,
    PYTHON,
    PrometheusAPI,
    Redis,
    Server,
    celery_environment,
    celery_worker,
    listening,
    redis_server,
    require_modules,
    rq_burst,
    rq_worker,
    run_to_exit,
    wait_for,
    worker_environment,
)

# Installed? (Looked up only: the servers import them in their own processes.)
require_modules(
    "celery",
    "rq",
    "redis",
    "psutil",
    "grpc",
    "opentelemetry.proto",
    "opentelemetry.exporter.prometheus",
    "opentelemetry.exporter.otlp.proto.http",
)

import redis as redis_client  # noqa: E402
import rq  # noqa: E402
from otlp_receiver import (  # noqa: E402
    HttpReceiver,
    check_one_pusher,
    histogram_totals,
    resources,
)

MULTIPROCESS = pytest.mark.multiprocess_mode

PAYLOAD = 4096  # tests/workers_apps/workers_job.py
RQ_OPERATION = "workers.rq.job"  # tests/workers_apps/rq_jobs.py
CELERY_OPERATION = "workers.celery.task"  # tests/workers_apps/celery_app.py
POOL_OPERATION = "workers.pool.call"  # tests/workers_apps/pool_calls.py
SERVICE_NAME = "meterage-jobs-test"


def job_environment(
    *,
    export: str = "none",
    metrics_port: int | None = None,
    otlp: str | None = None,
    multiprocess: bool = False,
) -> dict[str, str]:
    """The runners' environment (servers.worker_environment) with tests/workers_apps
    importable; RQ's settings module always configures its export."""
    inherited = os.environ.get("PYTHONPATH")
    return worker_environment(
        export=export,
        service_name=SERVICE_NAME,
        metrics_port=metrics_port,
        otlp=otlp,
        multiprocess=multiprocess,
        PYTHONPATH=os.pathsep.join([str(APPS), *([inherited] if inherited else [])]),
    )


@pytest.fixture
def redis() -> Iterator[Redis]:
    with redis_server() as server:
        yield server


# --- checks ----------------------------------------------------------------------------


def check_own_counts(counts: dict[str, Any]) -> None:
    """One job's report of its process's own snapshot, right after its one call."""
    assert counts["cpu_calls"] == counts["calls"], counts
    assert counts["cpu_sum"] > 0, counts
    assert counts["io_read_sum"] == counts["io_write_sum"] == PAYLOAD * counts["calls"], counts


def check_in_prometheus(
    api: PrometheusAPI, operation: str, calls: int, after: float, servers: list[Server]
) -> None:
    """A scrape that started after ``after`` (when the last job had ended) stored exactly
    ``calls`` calls of ``operation``, each with its CPU time and its IO, and none in flight."""
    api.wait_for_scrape(after, servers=servers)
    labels = {"meterage_operation": operation}
    assert api.total("meterage_call_duration_seconds_count", **labels) == calls
    assert api.total("meterage_call_cpu_time_seconds_count", **labels) == calls
    assert api.total("meterage_call_cpu_time_seconds_sum", **labels) > 0
    for direction in ("read", "write"):
        io = {**labels, "io_direction": direction}
        assert api.total("meterage_call_io_bytes_count", **io) == calls, direction
        assert api.total("meterage_call_io_bytes_sum", **io) == calls * PAYLOAD, direction
    assert api.total("meterage_calls_active", **labels) == 0


def check_in_otlp(
    receiver: HttpReceiver,
    operation: str,
    calls: int,
    after: int,
    servers: list[Server],
    *,
    group: bool = True,
) -> None:
    """The pushes that arrived after the first ``after`` (when the last job had ended):
    from the second on (collected after the jobs ended), exactly ``calls`` calls of
    ``operation`` with their CPU and IO; every push so far came from one pusher and
    (``group``) with one service.instance.id."""
    wait_for(
        lambda: len(receiver.requests) >= after + 3,
        what="3 OTLP pushes after the last job",
        servers=servers,
    )
    check_one_pusher(receiver.arrivals, PUSH_INTERVAL_S)
    pushes = receiver.requests
    operation_is = {"meterage.operation": operation}
    for push in pushes[after + 1 :]:
        assert histogram_totals(push, "meterage.call.duration", **operation_is)[0] == calls
        count, total = histogram_totals(push, "meterage.call.cpu.time", **operation_is)
        assert count == calls and total > 0
        for direction in ("read", "write"):
            io = {**operation_is, "io.direction": direction}
            assert histogram_totals(push, "meterage.call.io", **io) == (calls, calls * PAYLOAD)
    if group:
        instances = {r.get("service.instance.id") for p in pushes for r in resources(p)}
        assert len(instances) == 1 and None not in instances, instances
    assert {r.get("service.name") for p in pushes for r in resources(p)} == {SERVICE_NAME}


# --- RQ --------------------------------------------------------------------------------


@contextlib.contextmanager
def rq_queue(redis: Redis, name: str = "default") -> Iterator[rq.Queue]:
    connection = redis_client.Redis.from_url(redis.url())
    try:
        yield rq.Queue(name, connection=connection)
    finally:
        connection.close()


def wait_for_jobs(jobs: list[rq.job.Job], servers: list[Server]) -> None:
    """Until every job has finished; fails at once when one failed (with its traceback)."""

    def finished() -> bool:
        statuses = [job.get_status(refresh=True) for job in jobs]
        failed = [job for job, status in zip(jobs, statuses, strict=True) if status == "failed"]
        if failed:
            result = failed[0].latest_result()
            pytest.fail(f"job {failed[0].id} failed: {result and result.exc_string}")
        return all(status == "finished" for status in statuses)

    wait_for(finished, what=f"{len(jobs)} RQ jobs finished", timeout=30, servers=servers)


def test_rq_forks_a_work_horse_per_job_that_meters_it(redis):
    """rq's default Worker (burst mode) runs each job in a work horse of its own, forked for
    it, and the job's call is metered there with exact CPU and IO."""
    jobs_count = 6
    with rq_queue(redis) as queue:
        jobs = [queue.enqueue("rq_jobs.run_and_report", index) for index in range(jobs_count)]
        finished = rq_burst(redis, env=job_environment())
        assert finished.returncode == 0, finished.report()
        reports = [job.return_value(refresh=True) for job in jobs]
    assert all(report is not None for report in reports), finished.report()
    for report in reports:
        assert report["calls"] == 1, report  # a fresh horse: its own call only
        check_own_counts(report)
    assert len({report["pid"] for report in reports}) == jobs_count, "not a horse per job"


def test_rq_simple_worker_exports_every_job(redis, prometheus_target):
    """The harness's export checks, today: rq's SimpleWorker runs the jobs in its own
    process, the one that configured the export (its settings module), so every call
    reaches Prometheus and OTLP, with its CPU and IO."""
    jobs_count = 12
    metrics_port, api = prometheus_target
    with HttpReceiver() as receiver:
        env = job_environment(metrics_port=metrics_port, otlp=receiver.endpoint)
        simple = rq_worker(redis, settings="rq_settings", worker_class="rq.SimpleWorker", env=env)
        with simple as worker, rq_queue(redis) as queue:
            jobs = [queue.enqueue("rq_jobs.metered_job", index) for index in range(jobs_count)]
            wait_for_jobs(jobs, [worker])
            ended, pushed = time.time(), len(receiver.requests)
            assert [job.return_value() for job in jobs] == list(range(jobs_count))
            check_in_prometheus(api, RQ_OPERATION, jobs_count, ended, [worker])
            check_in_otlp(receiver, RQ_OPERATION, jobs_count, pushed, [worker], group=False)
            assert listening(worker.pids(), metrics_port) == [worker.process.pid]


@MULTIPROCESS
def test_rq_forking_worker_exports_every_job(redis, prometheus_target):
    """rq's default Worker with METERAGE_MULTIPROCESS=1, configuring the export in its own
    process (its settings module): the calls of the work horses, each forked for one job
    and ended with os._exit, all reach Prometheus and OTLP, with their CPU and IO."""
    jobs_count = 12
    metrics_port, api = prometheus_target
    with HttpReceiver() as receiver:
        env = job_environment(metrics_port=metrics_port, otlp=receiver.endpoint, multiprocess=True)
        with rq_worker(redis, settings="rq_settings", env=env) as worker, rq_queue(redis) as queue:
            jobs = [queue.enqueue("rq_jobs.metered_job", index) for index in range(jobs_count)]
            wait_for_jobs(jobs, [worker])
            ended, pushed = time.time(), len(receiver.requests)
            assert [job.return_value() for job in jobs] == list(range(jobs_count))
            check_in_prometheus(api, RQ_OPERATION, jobs_count, ended, [worker])
            check_in_otlp(receiver, RQ_OPERATION, jobs_count, pushed, [worker])
            assert listening(worker.pids(), metrics_port) == [worker.process.pid]


# --- Celery ----------------------------------------------------------------------------


def send_tasks(redis: Redis, task: str, count: int) -> list[Any]:
    """Sends ``count`` tasks from a client process of its own; their results."""
    client = run_to_exit(
        "celery-client",
        [PYTHON, str(APPS / "celery_client.py"), task, str(count)],
        env=celery_environment(redis, job_environment()),
        timeout=60,
    )
    assert client.returncode == 0, client.report()
    return client.result()


def test_celery_prefork_pool_processes_meter_their_tasks(redis):
    """Celery's prefork pool, 4 processes replaced after 3 tasks each: every task's call is
    metered in the pool process that ran it, with exact CPU and IO; each process's own
    counts add up to the tasks."""
    tasks = 16
    env = job_environment()
    with celery_worker("celery_app", redis=redis, env=env, max_tasks_per_child=3) as worker:
        reports = send_tasks(redis, "celery_app.run_and_report", tasks)
        assert worker.alive()
    for report in reports:
        check_own_counts(report)
    by_process: dict[int, int] = {}
    for report in reports:
        by_process[report["pid"]] = max(by_process.get(report["pid"], 0), report["calls"])
    assert sum(by_process.values()) == tasks, by_process
    assert max(by_process.values()) <= 3, "the pool processes were not replaced"
    assert worker.process.pid not in by_process


@MULTIPROCESS
def test_celery_prefork_pool_exports_every_task(redis, prometheus_target):
    """Celery's prefork pool with METERAGE_MULTIPROCESS=1, its main process configuring the
    export when it imports the app, before it forks the pool's 4 processes (each replaced
    after 3 tasks): every task's call reaches Prometheus and OTLP, with its CPU and IO."""
    tasks = 24
    metrics_port, api = prometheus_target
    with HttpReceiver() as receiver:
        env = job_environment(
            export="configure", metrics_port=metrics_port, otlp=receiver.endpoint, multiprocess=True
        )
        with celery_worker("celery_app", redis=redis, env=env, max_tasks_per_child=3) as worker:
            assert send_tasks(redis, "celery_app.metered_task", tasks) == list(range(tasks))
            ended, pushed = time.time(), len(receiver.requests)
            check_in_prometheus(api, CELERY_OPERATION, tasks, ended, [worker])
            check_in_otlp(receiver, CELERY_OPERATION, tasks, pushed, [worker])
            # Its pool processes, forked after it bound the port, must not keep the socket.
            assert listening(worker.pids(), metrics_port) == [worker.process.pid]


# --- multiprocessing.Pool --------------------------------------------------------------


def pool_calls(calls: int, method: str, how: str, maxtasks: int | None = None, **env: str) -> Any:
    argv = [PYTHON, str(APPS / "pool_calls.py"), str(calls), method, how]
    if maxtasks is not None:
        argv.append(str(maxtasks))
    finished = run_to_exit("pool", argv, env={**job_environment(), **env}, timeout=60)
    assert finished.returncode == 0, finished.report()
    return finished.result()


def test_pool_workers_meter_their_calls():
    """multiprocessing.Pool(4).map: every call is metered in the worker that ran it; each
    worker's own counts add up to the calls."""
    calls = 40
    result = pool_calls(calls, "fork", "env")
    by_worker: dict[int, int] = {}
    for pid, count in result["calls"]:
        by_worker[pid] = max(by_worker.get(pid, 0), count)
    assert sum(by_worker.values()) == calls, by_worker
    assert result["parent"] not in by_worker and len(by_worker) <= 4


@MULTIPROCESS
@pytest.mark.parametrize(
    ("method", "how", "maxtasks"),
    [
        ("fork", "env", None),
        ("fork", "enable", None),
        ("fork", "env", 5),
        ("forkserver", "env", None),
        ("spawn", "env", None),
        ("spawn", "enable", None),
    ],
    ids=["fork", "fork-enable", "fork-maxtasks", "forkserver", "spawn", "spawn-enable"],
)
def test_pool_map_calls_reach_the_parents_snapshot(method: str, how: str, maxtasks: int | None):
    """multiprocessing.Pool(4).map over N metered calls, in multiprocess mode from the
    environment or from meterage.multiprocess.enable() in the parent: the parent's
    snapshot has exactly N calls while the workers live (also when each was replaced
    after 5 calls), and still once the pool has terminated them."""
    calls = 40
    env = {"METERAGE_MULTIPROCESS": "1"} if how == "env" else {}
    result = pool_calls(calls, method, how, maxtasks, **env)
    assert (result["during"], result["after"]) == (calls, calls)
    workers = {pid for pid, _ in result["calls"]}
    assert result["parent"] not in workers
    if maxtasks is not None:
        assert len(workers) >= calls // maxtasks, "the workers were not replaced"
