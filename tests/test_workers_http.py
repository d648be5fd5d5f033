"""gunicorn and uvicorn, the real servers, serving a metered plain WSGI / ASGI app.

The apps are tests/workers_apps/wsgi_app.py and asgi_app.py (no framework): ``/work`` is one
metered call that answers the worker's PID, ``/`` answers the PID unmetered, ``/block`` holds
a worker, and ``WORKERS_APP_EXPORT`` says how the app exports (``configure``:
``meterage.otel.configure()`` with the Prometheus exporter; ``route``: the app's own
``/metrics`` page). Each worker writes ``booted.<pid>`` in the server's directory once it has
imported the app.

The tests marked ``MULTIPROCESS`` need issue 11's multiprocess mode (``METERAGE_MULTIPROCESS=1``
or ``meterage.multiprocess.enable()``): every worker's calls are the group's, and exactly one
process serves the group's Prometheus endpoint. They are strict xfails until it lands (then
the marks go). The others pass today and prove the harness: the servers boot, requests
reach workers, counts arrive exactly, workers restart and a killed worker is replaced.
"""

from __future__ import annotations

import importlib
import os
import signal
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from servers import (
    Load,
    Service,
    free_port,
    gunicorn,
    http_get,
    load,
    servers_required,
    uvicorn,
    wait_for,
)


def _need(module: str) -> Any:
    # CI (METERAGE_REQUIRE_SERVERS=1) installs '.[test]', which has them all: there a
    # missing one is an import error, not a skip.
    if servers_required():
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is in the test extra ('.[test]')")


for _module in ("gunicorn", "uvicorn", "psutil", "opentelemetry.exporter.prometheus"):
    _need(_module)

import psutil  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

MULTIPROCESS = pytest.mark.xfail(strict=True, reason="issue 11: multiprocess mode not built yet")

WSGI_OPERATION = "workers.wsgi.work"  # tests/workers_apps/wsgi_app.py
ASGI_OPERATION = "workers.asgi.work"  # tests/workers_apps/asgi_app.py
COUNT = "meterage_call_duration_seconds_count"
SERVICE_NAME = "meterage-workers-test"


def app_environment(
    *, export: str = "none", metrics_port: int | None = None, multiprocess: bool = False
) -> dict[str, str]:
    """The servers' environment: this one without OTEL_* and multiprocess settings, then
    the app's export, a Prometheus endpoint on ``metrics_port`` and, with ``multiprocess``,
    ``METERAGE_MULTIPROCESS=1``."""
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OTEL_", "METERAGE_MULTIPROCESS", "WORKERS_APP_"))
    }
    environ.update(PYTHONUNBUFFERED="1", WORKERS_APP_EXPORT=export, OTEL_SERVICE_NAME=SERVICE_NAME)
    if metrics_port is not None:
        environ.update(
            OTEL_METRICS_EXPORTER="prometheus",
            OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
            OTEL_EXPORTER_PROMETHEUS_PORT=str(metrics_port),
        )
    if multiprocess:
        environ["METERAGE_MULTIPROCESS"] = "1"
    return environ


# --- helpers ---------------------------------------------------------------------------


def booted_workers(service: Service) -> list[int]:
    """The live workers that have imported the app (each wrote booted.<pid>)."""
    return [pid for pid in service.workers() if (service.server.workdir / f"booted.{pid}").exists()]


def wait_for_workers(service: Service, count: int, timeout: float = 20.0) -> list[int]:
    """Waits until ``count`` workers are alive and have imported the app; fails (with the
    server's log) if its master exits first."""
    return wait_for(
        lambda: pids if len(pids := booted_workers(service)) >= count else None,
        what=f"{count} workers alive with the app imported",
        timeout=timeout,
        servers=[service.server],
    )


def served_by(*loads: Load) -> set[int]:
    """The PIDs of the workers that answered (the apps answer /work with their PID)."""
    return {int(body) for result in loads for body in result.bodies}


def count_in(page: bytes, operation: str, sample: str = COUNT) -> float:
    """The value of ``sample`` for ``operation`` on a Prometheus text page (0 if absent)."""
    total = 0.0
    for family in text_string_to_metric_families(page.decode()):
        for found in family.samples:
            if found.name == sample and found.labels.get("meterage_operation") == operation:
                total += found.value
    return total


def scrape(port: int, operation: str) -> float:
    return count_in(http_get(f"http://127.0.0.1:{port}/metrics"), operation)


def listening(pids: Iterable[int], port: int) -> list[int]:
    """Those of ``pids`` that have a socket listening on ``port``."""
    found = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            # psutil >= 6 calls it net_connections; older ones connections.
            connections = getattr(process, "net_connections", process.connections)(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections):
            found.append(pid)
    return found


def load_killing_a_worker(
    service: Service, requests: int, *, concurrency: int = 3
) -> tuple[Load, int]:
    """Sends ``requests`` GETs of /work while one worker, held by a /block request, is
    killed with SIGKILL half-way through. The killed worker runs no metered call when it
    dies, so the metered calls are exactly the /work requests answered. Returns the load
    and the killed worker's PID."""
    workdir = service.server.workdir
    killed: list[int] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        held = pool.submit(load, service.url("/block"), 1, timeout=20)
        pid = wait_for(
            lambda: next((int(p.name.split(".")[1]) for p in workdir.glob("blocked.*")), None),
            what="a worker holding /block",
            servers=[service.server],
        )

        def kill_half_way(done: int) -> None:
            if done == requests // 2:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        result = load(service.url("/work"), requests, concurrency=concurrency, after=kill_half_way)
        blocked = held.result()
    assert killed == [pid]
    assert blocked.ok == 0, "the held request outlived its worker"
    return result, pid


# --- gunicorn: the harness today -------------------------------------------------------


def test_gunicorn_one_worker_counts_every_request_in_a_real_prometheus(prometheus_target):
    requests = 40
    metrics_port, api = prometheus_target
    env = app_environment(export="configure", metrics_port=metrics_port)
    with gunicorn("wsgi_app:app", workers=1, env=env) as service:
        result = load(service.url("/work"), requests, concurrency=2)
        assert result.ok == requests, result.failures
        api.wait_for_scrape(time.time(), servers=[service.server])
        assert api.total(COUNT, meterage_operation=WSGI_OPERATION) == requests
        ((labels, _),) = api.query(f'target_info{{job="{api.job}"}}')
        assert labels["service_name"] == SERVICE_NAME


def test_gunicorn_workers_restart_and_a_killed_worker_is_replaced():
    """4 sync workers, each restarting after 6-9 requests; one is killed with SIGKILL
    mid-load: every /work request is still answered, and the master keeps 4 workers."""
    requests = 60
    with gunicorn(
        "wsgi_app:app", workers=4, max_requests=6, max_requests_jitter=3, env=app_environment()
    ) as service:
        wait_for_workers(service, 4)
        result, killed = load_killing_a_worker(service, requests)
        assert result.ok == requests, result.failures
        assert len(served_by(result)) > 4, "the workers did not restart"
        assert killed not in service.workers()
        wait_for_workers(service, 4)
        assert service.server.alive()


def test_gunicorn_one_worker_serves_its_own_counts_on_the_apps_metrics_route():
    requests = 30
    with gunicorn("wsgi_app:app", workers=1, env=app_environment(export="route")) as service:
        result = load(service.url("/work"), requests, concurrency=2)
        assert result.ok == requests, result.failures
        pages = load(service.url("/metrics"), 5)
        assert [count_in(page, WSGI_OPERATION) for page in pages.bodies] == [requests] * 5


# --- gunicorn: multiprocess mode -------------------------------------------------------


@MULTIPROCESS
def test_gunicorn_restarting_and_killed_workers_add_up_in_a_real_prometheus(prometheus_target):
    """4 sync workers restarting every 8-12 requests, the group's one Prometheus endpoint
    scraped by a real Prometheus: exactly the requests answered so far, during the load and
    after it, also once a worker was killed with SIGKILL mid-load."""
    first_batch, second_batch = 40, 40
    metrics_port, api = prometheus_target
    env = app_environment(export="configure", metrics_port=metrics_port, multiprocess=True)
    with gunicorn(
        "wsgi_app:app", workers=4, max_requests=8, max_requests_jitter=4, env=env
    ) as service:
        wait_for_workers(service, 4)
        first = load(service.url("/work"), first_batch, concurrency=4)
        assert first.ok == first_batch, first.failures
        api.wait_for_scrape(time.time(), servers=[service.server])
        assert api.total(COUNT, meterage_operation=WSGI_OPERATION) == first_batch

        second, _ = load_killing_a_worker(service, second_batch)
        assert second.ok == second_batch, second.failures
        api.wait_for_scrape(time.time(), servers=[service.server])
        assert api.total(COUNT, meterage_operation=WSGI_OPERATION) == first_batch + second_batch
        assert len(served_by(first, second)) > 4, "the workers did not restart"


ENABLE_IN_CONFIG = """\
import meterage.multiprocess

meterage.multiprocess.enable()  # in the master, before it forks its workers
"""


@MULTIPROCESS
@pytest.mark.parametrize("enabled_by", ["environment", "gunicorn.conf.py"])
def test_gunicorn_workers_share_one_prometheus_endpoint(enabled_by: str):
    """meterage.otel.configure() with the Prometheus exporter in every worker of 4: the
    service boots and stays up (today workers 2-4 fail to bind the port and the master
    exits "Worker failed to boot"), exactly one process serves the port, with every
    worker's calls; when it is killed another takes over, and the count stays."""
    requests = 40
    metrics_port = free_port()
    by_env = enabled_by == "environment"
    env = app_environment(export="configure", metrics_port=metrics_port, multiprocess=by_env)
    config = None if by_env else ENABLE_IN_CONFIG
    with gunicorn("wsgi_app:app", workers=4, config=config, env=env) as service:
        workers = wait_for_workers(service, 4)
        time.sleep(2)  # a few seconds on: still the same 4 workers, and the master
        assert service.server.alive()
        assert booted_workers(service) == workers

        result = load(service.url("/work"), requests, concurrency=4)
        assert result.ok == requests, result.failures
        assert len(served_by(result)) >= 2, "the load did not spread over the workers"
        serving = listening(service.server.pids(), metrics_port)
        assert len(serving) == 1, f"processes listening on the metrics port: {serving}"
        assert serving[0] in workers
        assert scrape(metrics_port, WSGI_OPERATION) == requests

        # The serving worker dies (idle: no call of its own in flight): another serves.
        os.kill(serving[0], signal.SIGKILL)
        successor = wait_for(
            lambda: [p for p in listening(service.server.pids(), metrics_port) if p != serving[0]],
            what="another process serving the metrics port",
            servers=[service.server],
        )
        assert len(successor) == 1
        assert scrape(metrics_port, WSGI_OPERATION) == requests
        wait_for_workers(service, 4)


@MULTIPROCESS
def test_gunicorn_preloaded_app_serves_the_group_from_the_master():
    """--preload: the master imports the app (so meterage.otel.configure() runs, and
    binds the port, there) before forking 4 workers; its endpoint has all their calls."""
    requests = 40
    metrics_port = free_port()
    env = app_environment(export="configure", metrics_port=metrics_port, multiprocess=True)
    with gunicorn("wsgi_app:app", workers=4, preload=True, env=env) as service:
        wait_for(lambda: len(service.workers()) == 4, what="4 workers", servers=[service.server])
        result = load(service.url("/work"), requests, concurrency=4)
        assert result.ok == requests, result.failures
        assert len(served_by(result)) >= 2, "the load did not spread over the workers"
        assert scrape(metrics_port, WSGI_OPERATION) == requests


@MULTIPROCESS
def test_gunicorn_apps_own_metrics_route_returns_the_group():
    """The app's own /metrics route (prometheus_client's generate_latest() with a
    PrometheusMetricReader attached by meterage.otel.attach) under 4 workers: every scrape
    of the idle service, whichever worker answers it, has every worker's calls (today each
    answers its own share, so the numbers jump between scrapes)."""
    requests, scrapes = 40, 24
    env = app_environment(export="route", multiprocess=True)
    with gunicorn("wsgi_app:app", workers=4, env=env) as service:
        wait_for_workers(service, 4)
        result = load(service.url("/work"), requests, concurrency=4)
        assert result.ok == requests, result.failures
        assert len(served_by(result)) >= 2, "the load did not spread over the workers"
        pages = load(service.url("/metrics"), scrapes, concurrency=4)
        assert pages.ok == scrapes, pages.failures
        assert [count_in(page, WSGI_OPERATION) for page in pages.bodies] == [requests] * scrapes


# --- uvicorn ---------------------------------------------------------------------------


def test_uvicorn_one_worker_counts_every_request_in_a_real_prometheus(prometheus_target):
    requests = 40
    metrics_port, api = prometheus_target
    env = app_environment(export="configure", metrics_port=metrics_port)
    with uvicorn("asgi_app:app", workers=1, env=env) as service:
        result = load(service.url("/work"), requests, concurrency=2)
        assert result.ok == requests, result.failures
        api.wait_for_scrape(time.time(), servers=[service.server])
        assert api.total(COUNT, meterage_operation=ASGI_OPERATION) == requests


def test_uvicorn_four_workers_boot_and_share_the_load():
    requests = 40
    with uvicorn("asgi_app:app", workers=4, env=app_environment()) as service:
        workers = wait_for_workers(service, 4)
        result = load(service.url("/work"), requests, concurrency=4)
        assert result.ok == requests, result.failures
        assert len(served_by(result)) >= 2, "the load did not spread over the workers"
        assert served_by(result) <= set(workers)


@MULTIPROCESS
def test_uvicorn_workers_add_up_in_a_real_prometheus(prometheus_target):
    """uvicorn --workers 4 (spawned workers, each importing the app and calling
    meterage.otel.configure()): a real Prometheus scraping the group's one endpoint sees
    exactly the requests answered by all of them."""
    requests = 40
    metrics_port, api = prometheus_target
    env = app_environment(export="configure", metrics_port=metrics_port, multiprocess=True)
    with uvicorn("asgi_app:app", workers=4, env=env) as service:
        wait_for_workers(service, 4)
        result = load(service.url("/work"), requests, concurrency=4)
        assert result.ok == requests, result.failures
        assert len(served_by(result)) >= 2, "the load did not spread over the workers"
        api.wait_for_scrape(time.time(), servers=[service.server])
        assert api.total(COUNT, meterage_operation=ASGI_OPERATION) == requests
