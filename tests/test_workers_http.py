"""gunicorn and uvicorn, the real servers, serving a metered plain WSGI / ASGI app.

The apps are tests/workers_apps/wsgi_app.py and asgi_app.py (no framework): ``/work`` is one
metered call that answers the worker's PID, ``/`` answers the PID unmetered, ``/block``
holds a worker outside any metered call, ``/held`` (WSGI) inside one, and
``WORKERS_APP_EXPORT`` says how the app exports (``configure``: ``meterage.otel.configure()``
from the OTEL_* variables, a Prometheus endpoint or OTLP pushes; ``route``: the app's own
``/metrics`` page). Each worker writes ``booted.<pid>`` in the server's directory once it
has imported the app.

The tests marked ``MULTIPROCESS`` need issue 11's multiprocess mode (``METERAGE_MULTIPROCESS=1``
or ``meterage.multiprocess.enable()``): every worker's calls are the group's, and exactly one
process serves the group's Prometheus endpoint or pushes its OTLP. They are strict xfails
until it lands (then the marks go). The others pass today and prove the harness: the
servers boot, requests reach workers, counts arrive exactly, workers restart and a killed
worker is replaced.
"""

from __future__ import annotations

import http.client
import os
import signal
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from servers import (
    PUSH_INTERVAL_S,
    Load,
    PrometheusAPI,
    Service,
    connected,
    free_port,
    gone,
    gunicorn,
    http_get,
    listening,
    load,
    require_modules,
    uvicorn,
    wait_for,
    worker_environment,
)

# Installed? (Looked up only: the servers import them in their own processes.)
require_modules(
    "gunicorn",
    "uvicorn",
    "psutil",
    "prometheus_client",
    "grpc",
    "opentelemetry.proto",
    "opentelemetry.exporter.prometheus",
    "opentelemetry.exporter.otlp.proto.http",
)

from otlp_receiver import HttpReceiver, check_one_pusher, histogram_totals, resources  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

MULTIPROCESS = pytest.mark.multiprocess_mode

WSGI_OPERATION = "workers.wsgi.work"  # tests/workers_apps/wsgi_app.py
WSGI_HELD = "workers.wsgi.held"
ASGI_OPERATION = "workers.asgi.work"  # tests/workers_apps/asgi_app.py
COUNT = "meterage_call_duration_seconds_count"
ACTIVE = "meterage_calls_active"
SERVICE_NAME = "meterage-workers-test"
#: How soon another process must serve the group's Prometheus port once its server died:
#: one collection interval (about 1 s) and a margin for this 2-core machine.
TAKEOVER_S = 5.0
#: Spawned interpreters (uvicorn's workers) booting 4 at once on 2 cores: ~1 s.
UVICORN_BOOT_S = 15.0


def app_environment(
    *,
    export: str = "none",
    metrics_port: int | None = None,
    otlp: str | None = None,
    multiprocess: bool = False,
) -> dict[str, str]:
    """The servers' environment (servers.worker_environment)."""
    return worker_environment(
        export=export,
        service_name=SERVICE_NAME,
        metrics_port=metrics_port,
        otlp=otlp,
        multiprocess=multiprocess,
    )


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


def wait_for_forked_workers(service: Service, count: int) -> list[int]:
    """Waits until the master has ``count`` live workers (with --preload they import
    nothing: there is no booted.<pid> to wait for)."""
    return wait_for(
        lambda: pids if len(pids := service.workers()) >= count else None,
        what=f"{count} workers",
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


def page_of(port: int) -> bytes | None:
    """The metrics page served on ``port``, or None when nothing answers it."""
    try:
        return http_get(f"http://127.0.0.1:{port}/metrics", timeout=2.0)
    except (OSError, http.client.HTTPException):  # refused, reset, cut short
        return None


def scrape(port: int, operation: str, sample: str = COUNT) -> float:
    page = page_of(port)
    assert page is not None, f"nothing serves the metrics port {port}"
    return count_in(page, operation, sample)


def held_by(workdir: Path, tag: str) -> int | None:
    """The PID of the worker that wrote ``<tag>.<pid>`` (it holds a request), if any."""
    return next((int(p.name.split(".")[1]) for p in workdir.glob(f"{tag}.*")), None)


def load_killing_a_worker(
    service: Service, requests: int, *, concurrency: int = 3
) -> tuple[Load, int]:
    """Sends ``requests`` GETs of /work while one worker, held by a /block request (which
    stops it, event loop included), is killed with SIGKILL half-way through. The killed
    worker runs no metered call when it dies, and accepts no connection after /block, so
    the metered calls are exactly the /work requests answered. Returns the load and the
    killed worker's PID."""
    workdir = service.server.workdir
    killed: list[int] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        held = pool.submit(load, service.url("/block"), 1, timeout=20)
        pid = wait_for(
            lambda: held_by(workdir, "blocked"),
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


def check_every_scrape(
    api: PrometheusAPI, operation: str, since: float, loads: Iterable[Load], total: int
) -> None:
    """Every scrape Prometheus stored since ``since``: the counts never go backwards, each
    has at least the requests answered before it started (a call is recorded before its
    response is sent) and at most ``total``, and the last is ``total``."""
    answered = sorted(stamp for result in loads for stamp in result.answered_at)
    scrapes = api.scrapes(COUNT, since, meterage_operation=operation)
    assert scrapes, "no scrape was stored"
    values = [value for _, value in scrapes]
    assert values == sorted(values), f"the count went backwards: {scrapes}"
    assert values[-1] == total, scrapes
    # Prometheus may move a scrape's timestamp by up to 2 ms (timestamp tolerance).
    floors = [(stamp, sum(1 for a in answered if a < stamp - 0.01)) for stamp, _ in scrapes]
    short = [(s, v, f) for (s, v), (_, f) in zip(scrapes, floors, strict=True) if v < f]
    assert not short, f"scrapes with fewer calls than requests answered before them: {short}"


def load_and_kill_in_a_real_prometheus(
    service: Service, api: PrometheusAPI, operation: str, batches: tuple[int, int]
) -> tuple[Load, Load]:
    """A first batch of /work requests, then a second one during which a worker is killed;
    after each, a scrape that started later stores exactly the requests answered so far,
    and no scrape of the whole time shows a count that went backwards or missed a
    request answered before it."""
    first_batch, second_batch = batches
    since = time.time()
    first = load(service.url("/work"), first_batch, concurrency=4)
    assert first.ok == first_batch, first.failures
    api.wait_for_scrape(time.time(), servers=[service.server])
    assert api.total(COUNT, meterage_operation=operation) == first_batch

    second, _ = load_killing_a_worker(service, second_batch)
    assert second.ok == second_batch, second.failures
    api.wait_for_scrape(time.time(), servers=[service.server])
    assert api.total(COUNT, meterage_operation=operation) == first_batch + second_batch
    check_every_scrape(api, operation, since, [first, second], first_batch + second_batch)
    return first, second


def wait_for_pushes(
    receiver: HttpReceiver, after: int, count: int, servers: Iterable[Any] = ()
) -> list[Any]:
    """The requests that arrived after the first ``after``, once there are ``count``."""
    return wait_for(
        lambda: found if len(found := receiver.requests[after:]) >= count else None,
        what=f"{count} OTLP pushes",
        servers=list(servers),
    )


# --- gunicorn: the harness today -------------------------------------------------------


def test_gunicorn_one_worker_counts_every_request_in_a_real_prometheus(prometheus_target):
    """One worker, no restarts: the harness's Prometheus checks, the metrics port held by
    the worker, and every stored scrape consistent with the requests answered."""
    batches = (30, 30)
    metrics_port, api = prometheus_target
    env = app_environment(export="configure", metrics_port=metrics_port)
    with gunicorn("wsgi_app:app", workers=1, env=env) as service:
        (worker,) = wait_for_workers(service, 1)
        assert listening(service.server.pids(), metrics_port) == [worker]
        since = time.time()
        loads = []
        for size in batches:
            loads.append(load(service.url("/work"), size, concurrency=2))
            assert loads[-1].ok == size, loads[-1].failures
            api.wait_for_scrape(time.time(), servers=[service.server])
        assert api.total(COUNT, meterage_operation=WSGI_OPERATION) == sum(batches)
        check_every_scrape(api, WSGI_OPERATION, since, loads, sum(batches))
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


def test_gunicorn_one_worker_pushes_its_counts_over_otlp():
    """The harness's OTLP checks: one worker pushing every 500 ms over one kept-alive
    connection, its cumulative counts exact."""
    requests = 30
    with HttpReceiver() as receiver:
        env = app_environment(export="configure", otlp=receiver.endpoint)
        with gunicorn("wsgi_app:app", workers=1, env=env) as service:
            (worker,) = wait_for_workers(service, 1)
            result = load(service.url("/work"), requests, concurrency=2)
            assert result.ok == requests, result.failures
            pushes = wait_for_pushes(receiver, len(receiver.requests), 2, [service.server])
            assert connected(service.server.pids(), receiver.port) == [worker]
            # (Before the worker exits: its last push, at exit, comes when it comes.)
            check_one_pusher(receiver.arrivals, PUSH_INTERVAL_S)
        operation = {"meterage.operation": WSGI_OPERATION}
        assert histogram_totals(pushes[-1], "meterage.call.duration", **operation)[0] == requests
        assert {r.get("service.name") for p in pushes for r in resources(p)} == {SERVICE_NAME}


# --- gunicorn: multiprocess mode -------------------------------------------------------


@MULTIPROCESS
@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_gunicorn_restarting_and_killed_workers_add_up_in_a_real_prometheus(
    prometheus_target, preload: bool
):
    """4 sync workers restarting every 8-12 requests, the group's one Prometheus endpoint
    (served by a worker, or by the master that preloaded the app) scraped by a real
    Prometheus: exactly the requests answered so far, during the load and after it, also
    once a worker was killed with SIGKILL mid-load."""
    metrics_port, api = prometheus_target
    env = app_environment(export="configure", metrics_port=metrics_port, multiprocess=True)
    with gunicorn(
        "wsgi_app:app", workers=4, max_requests=8, max_requests_jitter=4, preload=preload, env=env
    ) as service:
        wait_for_forked_workers(service, 4)
        first, second = load_and_kill_in_a_real_prometheus(
            service, api, WSGI_OPERATION, batches=(40, 40)
        )
        assert len(served_by(first, second)) > 4, "the workers did not restart"


ENABLE_IN_CONFIG = """\
import meterage.multiprocess

meterage.multiprocess.enable()  # in the master, before it forks its workers
"""


@MULTIPROCESS
@pytest.mark.parametrize("enabled_by", ["environment", "gunicorn --env", "gunicorn.conf.py"])
def test_gunicorn_workers_share_one_prometheus_endpoint(enabled_by: str):
    """meterage.otel.configure() with the Prometheus exporter in every worker of 4: the
    service boots and stays up (today workers 2-4 fail to bind the port and the master
    exits "Worker failed to boot"), exactly one process serves the port, with every
    worker's calls; when it is killed another serves it within TAKEOVER_S, with the same
    count, and the master keeps 4 workers."""
    requests = 40
    metrics_port = free_port()
    env = app_environment(
        export="configure", metrics_port=metrics_port, multiprocess=enabled_by == "environment"
    )
    args = ["--env", "METERAGE_MULTIPROCESS=1"] if enabled_by == "gunicorn --env" else []
    config = ENABLE_IN_CONFIG if enabled_by == "gunicorn.conf.py" else None
    with gunicorn("wsgi_app:app", workers=4, config=config, args=args, env=env) as service:
        workers = wait_for_workers(service, 4)
        serving = wait_for(
            lambda: listening(service.server.pids(), metrics_port),
            what="a process serving the metrics port",
            servers=[service.server],
        )
        assert len(serving) == 1, f"processes listening on the metrics port: {serving}"

        result = load(service.url("/work"), requests, concurrency=4)
        assert result.ok == requests, result.failures
        assert len(served_by(result)) >= 2, "the load did not spread over the workers"
        assert booted_workers(service) == workers, "a worker died or was replaced"
        assert listening(service.server.pids(), metrics_port) == serving
        assert scrape(metrics_port, WSGI_OPERATION) == requests

        # The serving process dies (idle: no call of its own in flight): another serves.
        os.kill(serving[0], signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: gone(serving[0]), what=f"process {serving[0]} dead")
        page = wait_for(
            lambda: page_of(metrics_port),
            what="another process serving the metrics port",
            timeout=TAKEOVER_S,
            servers=[service.server],
        )
        took = time.monotonic() - killed_at
        assert count_in(page, WSGI_OPERATION) == requests, f"taken over after {took:.2f} s"
        successor = listening(service.server.pids(), metrics_port)
        assert len(successor) == 1 and successor != serving, successor
        wait_for_workers(service, 4)
        assert scrape(metrics_port, WSGI_OPERATION) == requests


@MULTIPROCESS
def test_gunicorn_preloaded_app_serves_the_group_from_the_master():
    """--preload: the master imports the app (so meterage.otel.configure() runs there, and
    nowhere else) before forking 4 workers: one process listens on the port (the workers
    forked from the one that bound it must not keep its listening socket), and its endpoint
    has all their calls."""
    requests = 40
    metrics_port = free_port()
    env = app_environment(export="configure", metrics_port=metrics_port, multiprocess=True)
    with gunicorn("wsgi_app:app", workers=4, preload=True, env=env) as service:
        wait_for_forked_workers(service, 4)
        result = load(service.url("/work"), requests, concurrency=4)
        assert result.ok == requests, result.failures
        assert len(served_by(result)) >= 2, "the load did not spread over the workers"
        assert scrape(metrics_port, WSGI_OPERATION) == requests
        serving = listening(service.server.pids(), metrics_port)
        assert len(serving) == 1, f"processes listening on the metrics port: {serving}"


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


@MULTIPROCESS
@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_gunicorn_workers_push_the_group_once_over_otlp(preload: bool):
    """meterage.otel.configure() with OTLP pushes every 500 ms, in each of 4 workers or
    (--preload) in the master before it forks them (the SDK restarts its periodic reader's
    thread in every fork child): one process pushes (no two pushes closer than one pusher
    makes them; without --preload, one connection to the receiver, from one PID, the whole
    time), every push has one service.instance.id, the same for the group, and once the
    load is done each later push has exactly its calls."""
    requests = 40
    with HttpReceiver() as receiver:
        env = app_environment(export="configure", otlp=receiver.endpoint, multiprocess=True)
        with gunicorn("wsgi_app:app", workers=4, preload=preload, env=env) as service:
            wait_for_forked_workers(service, 4)
            pushers: set[int] = set()

            def note_pushers() -> None:
                # Forked from a process with a connection, a worker holds a copy of it.
                if not preload:
                    pushers.update(connected(service.server.pids(), receiver.port))

            result = load(
                service.url("/work"), requests, concurrency=4, after=lambda _: note_pushers()
            )
            assert result.ok == requests, result.failures
            assert len(served_by(result)) >= 2, "the load did not spread over the workers"
            done = len(receiver.requests)
            # A push that arrived after the load may have been collected before it ended;
            # the next one (one pusher pushes in turn) was not. A few more: the count stays.
            wait_for(
                lambda: note_pushers() or len(receiver.requests) >= done + 4,
                what="4 OTLP pushes after the load",
                servers=[service.server],
            )
            assert len(pushers) == (0 if preload else 1), f"pushing: {sorted(pushers)}"
            pushes = receiver.requests
            check_one_pusher(receiver.arrivals, PUSH_INTERVAL_S)
    operation = {"meterage.operation": WSGI_OPERATION}
    counts = [histogram_totals(p, "meterage.call.duration", **operation)[0] for p in pushes]
    assert counts[done + 1 :] == [requests] * (len(pushes) - done - 1), counts
    assert counts == sorted(counts), f"the cumulative count went backwards: {counts}"
    instances = {r.get("service.instance.id") for p in pushes for r in resources(p)}
    assert len(instances) == 1 and None not in instances, instances


@MULTIPROCESS
def test_gunicorn_calls_in_flight_count_live_workers_only():
    """A metered call in flight shows in the group's calls-in-flight gauge; once its worker
    is killed with SIGKILL it no longer does (the gauge sums live processes), and the
    killed call is not counted as a call (a killed process loses its calls in flight)."""
    requests = 20
    metrics_port = free_port()
    env = app_environment(export="configure", metrics_port=metrics_port, multiprocess=True)
    with gunicorn("wsgi_app:app", workers=4, env=env) as service:
        wait_for_workers(service, 4)
        result = load(service.url("/work"), requests, concurrency=4)
        assert result.ok == requests, result.failures
        with ThreadPoolExecutor(max_workers=1) as pool:
            held = pool.submit(load, service.url("/held"), 1, timeout=20)
            holder = wait_for(
                lambda: held_by(service.server.workdir, "held"),
                what="a worker in the held call",
                servers=[service.server],
            )
            page = wait_for(lambda: page_of(metrics_port), what="the metrics page")
            assert count_in(page, WSGI_HELD, ACTIVE) == 1
            assert count_in(page, WSGI_OPERATION, ACTIVE) == 0
            assert count_in(page, WSGI_OPERATION) == requests

            os.kill(holder, signal.SIGKILL)
            wait_for(lambda: gone(holder), what=f"process {holder} dead")
            wait_for(
                lambda: (page := page_of(metrics_port)) and count_in(page, WSGI_HELD, ACTIVE) == 0,
                what="the killed worker's call gone from the calls in flight",
                timeout=TAKEOVER_S,
                servers=[service.server],
            )
            assert held.result().ok == 0
        page = page_of(metrics_port)
        assert page is not None
        assert count_in(page, WSGI_HELD) == 0, "the call killed in flight was counted"
        assert count_in(page, WSGI_OPERATION) == requests


@MULTIPROCESS
def test_two_gunicorn_services_on_one_machine_keep_their_own_numbers():
    """Two services of the same app, side by side, both in multiprocess mode: each page of
    each service has exactly its own group's calls."""
    requests = {"a": 20, "b": 32}
    env = app_environment(export="route", multiprocess=True)
    with (
        gunicorn("wsgi_app:app", workers=2, env=env) as a,
        gunicorn("wsgi_app:app", workers=2, env=env) as b,
    ):
        services = {"a": a, "b": b}
        for name, service in services.items():
            wait_for_workers(service, 2)
            result = load(service.url("/work"), requests[name], concurrency=4)
            assert result.ok == requests[name], result.failures
            assert len(served_by(result)) == 2, "the load did not spread over the workers"
        for name, service in services.items():
            pages = load(service.url("/metrics"), 8, concurrency=2)
            assert pages.ok == 8, pages.failures
            counts = [count_in(page, WSGI_OPERATION) for page in pages.bodies]
            assert counts == [requests[name]] * 8, name


@MULTIPROCESS
def test_a_crashed_service_leaves_nothing_to_the_next_one(tmp_path: Path):
    """A service killed outright (SIGKILL to its master and workers at once: nothing
    cleans up), then the same service started again, in the same directory on the same
    port: the new one's pages have its own calls only."""
    port = free_port()
    env = app_environment(export="route", multiprocess=True)

    def serve(requests: int, then: Callable[[Service], None]) -> None:
        with gunicorn("wsgi_app:app", workers=2, env=env, port=port, workdir=tmp_path) as service:
            wait_for_workers(service, 2)
            result = load(service.url("/work"), requests, concurrency=4)
            assert result.ok == requests, result.failures
            assert len(served_by(result)) == 2, "the load did not spread over the workers"
            pages = load(service.url("/metrics"), 8, concurrency=2)
            assert [count_in(page, WSGI_OPERATION) for page in pages.bodies] == [requests] * 8
            then(service)

    def crash(service: Service) -> None:
        os.killpg(service.server.process.pid, signal.SIGKILL)
        service.server.process.wait(5)
        wait_for(lambda: not service.server.pids(), what="every process of the service gone")

    serve(30, crash)
    serve(12, lambda _: None)


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


def test_uvicorn_four_workers_share_the_load_and_a_killed_one_is_replaced():
    """uvicorn --workers 4 spawns 4 workers; one is killed with SIGKILL mid-load: every
    /work request is still answered, by the workers, and the supervisor spawns a new one."""
    requests = 40
    with uvicorn("asgi_app:app", workers=4, env=app_environment()) as service:
        workers = wait_for_workers(service, 4, timeout=UVICORN_BOOT_S)
        result, killed = load_killing_a_worker(service, requests)
        assert result.ok == requests, result.failures
        assert len(served_by(result)) >= 2, "the load did not spread over the workers"
        assert served_by(result) <= set(workers)
        assert killed in workers and killed not in served_by(result)
        replaced = wait_for_workers(service, 4, timeout=UVICORN_BOOT_S)
        assert killed not in replaced


@MULTIPROCESS
def test_uvicorn_workers_add_up_in_a_real_prometheus(prometheus_target):
    """uvicorn --workers 4 (spawned workers, each importing the app and calling
    meterage.otel.configure()): a real Prometheus scraping the group's one endpoint sees
    exactly the requests answered, during the load and after it, also once a worker was
    killed with SIGKILL mid-load."""
    metrics_port, api = prometheus_target
    env = app_environment(export="configure", metrics_port=metrics_port, multiprocess=True)
    with uvicorn("asgi_app:app", workers=4, env=env) as service:
        wait_for_workers(service, 4, timeout=UVICORN_BOOT_S)
        first, second = load_and_kill_in_a_real_prometheus(
            service, api, ASGI_OPERATION, batches=(40, 40)
        )
        assert len(served_by(first, second)) >= 2, "the load did not spread over the workers"
