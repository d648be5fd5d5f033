"""Adversarial tests of the request middlewares and OpenCall.

The middlewares run under real servers (uvicorn on asyncio and uvloop, hypercorn on trio,
gunicorn's sync and gthread workers) with real HTTP requests over loopback; the apps are
tests/workers_apps/adv_*.py. The awaitable's protocol and OpenCall are driven in-process.

A meter must never change the application: its return values, its exceptions, what the
server sees. Nothing recorded may be lost or counted twice, and calls in flight must come
back to zero. The 15 defects this file found at first (an object with a ``send`` taken for a
generator, nested steps charged twice, a run's outcome lost while its call ended elsewhere,
trio, hypercorn before 3.12, a route mounted twice, a later task factory, sendfile, a
cancellation through an iterator without ``throw``, a non-awaitable application, a bytes
scheme) are fixed; their tests stay.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import contextlib
import contextvars
import copy
import gc
import http.client
import inspect
import io
import json
import os
import sys
import threading
import time
import warnings
import weakref
import wsgiref.simple_server
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import servers

import meterage
from meterage.asgi import MeterageMiddleware as AsgiMiddleware
from meterage.wsgi import MeterageMiddleware as WsgiMiddleware

OPERATION = "http.server.request"
BURN_NS = 20_000_000


# --- helpers ---------------------------------------------------------------------------


def request(
    port: int,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, headers={"Connection": "close", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def keep_alive_gets(port: int, paths: list[str], headers: Callable[[int], dict] | None = None):
    """GETs each of ``paths`` in order on one kept-alive connection; the statuses."""
    statuses = []
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for index, path in enumerate(paths):
            connection.request("GET", path, headers=headers(index) if headers else {})
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        connection.close()
    return statuses


def rows_of(port: int) -> list[dict[str, Any]]:
    status, body = request(port, "/charged")
    assert status == 200, body
    return json.loads(body)["rows"]  # type: ignore[no-any-return]


def matching(rows: list[dict[str, Any]], **attributes: Any) -> list[dict[str, Any]]:
    return [
        row
        for row in rows
        if all(row["attributes"].get(key) == value for key, value in attributes.items())
    ]


def counted(port: int, **attributes: Any) -> int:
    return sum(row["count"] for row in matching(rows_of(port), **attributes))


def in_flight(rows: list[dict[str, Any]]) -> int:
    """Requests in flight, less the /charged request asking."""
    return sum(row["active"] or 0 for row in rows) - 1


def settle(port: int, what: str, condition: Callable[[list[dict[str, Any]]], bool]) -> list:
    """The rows once ``condition(rows)`` holds (a request's call ends just after its
    response is sent, so the client can ask before that)."""
    return servers.wait_for(  # type: ignore[no-any-return]
        lambda: (lambda rows: rows if condition(rows) else None)(rows_of(port)),
        what=what,
        timeout=20,
    )


@contextlib.contextmanager
def asgi_server(
    app: str, *, server: str = "uvicorn", loop: str = "asyncio", env: dict | None = None
) -> Iterator[servers.Service]:
    """uvicorn (``--loop asyncio|uvloop``) or hypercorn (``-k asyncio|trio``) serving
    ``app`` from tests/workers_apps on a free loopback port."""
    port = servers.free_port()
    if server == "uvicorn":
        argv = [
            servers.PYTHON,
            "-m",
            "uvicorn",
            app,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--app-dir",
            str(servers.APPS),
            "--no-access-log",
            "--loop",
            loop,
            "--lifespan",
            "off",
            "--timeout-graceful-shutdown",
            "2",
        ]
    else:
        argv = [
            servers.PYTHON,
            "-m",
            "hypercorn",
            "--bind",
            f"127.0.0.1:{port}",
            "--worker-class",
            loop,
            "--graceful-timeout",
            "2",
            app,
        ]
    environ = servers._environment(
        None, PYTHONPATH=servers.python_path(servers.APPS), **(env or {})
    )
    # hypercorn: ready once it listens (its first request may be the one that fails).
    ready: dict[str, Any] = (
        {"ready_url": f"http://127.0.0.1:{port}/"}
        if server == "uvicorn"
        else {"ready_text": "Running on"}
    )
    with servers.running(server, argv, env=environ, timeout=30, **ready) as running:
        yield servers.Service(running, port)


# --- ASGI under real servers -----------------------------------------------------------


@pytest.fixture(scope="module")
def fastapi_service() -> Iterator[servers.Service]:
    servers.require_modules("fastapi", "uvicorn")
    with asgi_server("adv_asgi:app") as service:
        yield service


def test_mounts_with_parameters_and_routes_are_templates(fastapi_service) -> None:
    port = fastapi_service.port
    for tenant, user in (("acme", 1), ("globex", 2), ("initech", 3)):
        assert request(port, f"/tenants/{tenant}/users/{user}") == (
            200,
            f"{tenant}/{user}".encode(),
        )
    for item_id in (1, 2):
        assert request(port, f"/items/{item_id}")[0] == 200
    rows = settle(
        port,
        "5 routed requests",
        lambda rows: (
            sum(r["count"] for r in matching(rows, **{"http.route": "/items/{item_id}"})) == 2
            and sum(
                r["count"]
                for r in matching(rows, **{"http.route": "/tenants/{tenant}/users/{user}"})
            )
            == 3
        ),
    )
    assert in_flight(rows) == 0


def test_a_sub_application_mounted_twice_names_each_mount(fastapi_service) -> None:
    port = fastapi_service.port
    for _ in range(3):
        assert request(port, "/v1/things/5") == (200, b'{"thing":5}')
        assert request(port, "/v2/things/6") == (200, b'{"thing":6}')

    def both(rows: list[dict[str, Any]]) -> bool:
        total = sum(r["count"] for r in matching(rows, **{"http.route": "/v1/things/{thing}"}))
        total += sum(r["count"] for r in matching(rows, **{"http.route": "/v2/things/{thing}"}))
        return total >= 6

    rows = settle(port, "6 requests to the two mounts", both)
    v2 = sum(r["count"] for r in matching(rows, **{"http.route": "/v2/things/{thing}"}))
    assert v2 == 3


def test_failures_404s_streams_and_head_keep_the_response(fastapi_service) -> None:
    port = fastapi_service.port
    before_404 = counted(port, **{"http.response.status_code": 404})
    assert request(port, "/boom")[0] == 500
    assert request(port, "/no/such/path")[0] == 404
    assert request(port, "/stream") == (200, b"chunk0\nchunk1\nchunk2\n")
    assert request(port, "/items/3", method="HEAD") == (200, b"")
    rows = settle(
        port,
        "the failure, the 404, the stream and the HEAD",
        lambda rows: (
            sum(r["count"] for r in matching(rows, **{"error.type": "LookupError"})) >= 1
            and sum(r["count"] for r in matching(rows, **{"http.response.status_code": 404}))
            >= before_404 + 1
            and sum(r["count"] for r in matching(rows, **{"http.route": "/stream"})) >= 1
            and sum(r["count"] for r in matching(rows, **{"http.request.method": "HEAD"})) >= 1
        ),
    )
    (failed,) = matching(rows, **{"error.type": "LookupError"})
    assert failed["attributes"]["http.response.status_code"] == 500
    assert failed["attributes"]["http.route"] == "/boom"
    assert in_flight(rows) == 0


def test_unmatched_paths_share_one_series(fastapi_service) -> None:
    """20,000 distinct unmatched paths (over four kept-alive connections): one series, no
    route, every request counted once."""
    port = fastapi_service.port
    before = counted(port, **{"http.response.status_code": 404})
    per_client = 5_000
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(
                lambda client: keep_alive_gets(
                    port, [f"/unmatched/{client}/{n}?q={n}" for n in range(per_client)]
                ),
                range(4),
            )
        )
    assert all(status == 404 for statuses in results for status in statuses)
    rows = settle(
        port,
        "20,000 404s",
        lambda rows: (
            sum(r["count"] for r in matching(rows, **{"http.response.status_code": 404}))
            >= before + 4 * per_client
        ),
    )
    not_found = matching(rows, **{"http.response.status_code": 404})
    assert len(not_found) == 1 and "http.route" not in not_found[0]["attributes"]
    assert not_found[0]["count"] == before + 4 * per_client
    assert not matching(rows, **{"otel.metric.overflow": True})
    assert in_flight(rows) == 0


def test_a_client_that_goes_away_leaves_nothing_in_flight(fastapi_service) -> None:
    port = fastapi_service.port
    for _ in range(5):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=0.2)
        connection.request("GET", "/cancel-me")
        with pytest.raises(OSError):  # no body within the timeout: the client gives up
            connection.getresponse().read()
        connection.close()
    rows = settle(
        port,
        "the cancelled requests to end",
        lambda rows: (
            sum(r["count"] for r in matching(rows, **{"http.route": "/cancel-me"})) >= 5
            and in_flight(rows) == 0
        ),
    )
    for row in matching(rows, **{"http.route": "/cancel-me"}):
        # Its response had started (200); Starlette ended the stream: not a failure.
        assert row["attributes"].get("http.response.status_code") == 200


# Last of the tests on fastapi_service: the overflow series takes every new series after it.
def test_a_flood_of_tenants_is_bounded_by_the_overflow_series(fastapi_service) -> None:
    """3,000 distinct tenants against a cardinality limit of 50: at most 50 series, the rest
    in the overflow series, and not one request lost or counted twice."""
    port = fastapi_service.port
    before = counted(port, **{"http.route": "/items/{item_id}"})
    before_overflow = counted(port, **{"otel.metric.overflow": True})
    per_client = 1_000
    with ThreadPoolExecutor(3) as pool:
        results = list(
            pool.map(
                lambda client: keep_alive_gets(
                    port,
                    ["/items/1"] * per_client,
                    lambda n, client=client: {"x-tenant": f"t{client}-{n}"},
                ),
                range(3),
            )
        )
    assert all(status == 200 for statuses in results for status in statuses)
    rows = settle(
        port,
        "3,000 tenants' requests",
        lambda rows: (
            sum(r["count"] for r in matching(rows, **{"http.route": "/items/{item_id}"}))
            + sum(r["count"] for r in matching(rows, **{"otel.metric.overflow": True}))
            >= before + before_overflow + 3 * per_client
        ),
    )
    # The limit's 50 series, the overflow series, and the meter's own series holding the
    # /charged request in flight.
    assert len(rows) <= 50 + 2
    overflow = sum(r["count"] for r in matching(rows, **{"otel.metric.overflow": True}))
    items = sum(r["count"] for r in matching(rows, **{"http.route": "/items/{item_id}"}))
    assert overflow > before_overflow
    assert items + overflow == before + before_overflow + 3 * per_client
    assert in_flight(rows) == 0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_created_tasks_are_charged_on_asyncio_and_uvloop(loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    with asgi_server("adv_asgi:app", loop=loop) as service:
        port = service.port
        status, body = request(port, "/loop")
        assert status == 200 and json.loads(body)["loop"].startswith(loop)
        for _ in range(4):
            assert request(port, "/burn/task") == (200, b'"burnt"')
        rows = settle(
            port,
            "4 /burn/task requests",
            lambda rows: (
                sum(r["count"] for r in matching(rows, **{"http.route": "/burn/task"})) == 4
            ),
        )
        (row,) = matching(rows, **{"http.route": "/burn/task"})
        assert row["cpu_ns"] >= 4 * BURN_NS * 0.9
        assert in_flight(rows) == 0


def test_a_task_factory_set_after_the_middleware_keeps_tasks_charged() -> None:
    with asgi_server("adv_asgi:app") as service:
        port = service.port
        assert request(port, "/burn/task")[0] == 200
        assert request(port, "/factory") == (200, b'"set"')
        for _ in range(3):
            assert request(port, "/burn/task")[0] == 200
        rows = settle(
            port,
            "4 /burn/task requests",
            lambda rows: (
                sum(r["count"] for r in matching(rows, **{"http.route": "/burn/task"})) == 4
            ),
        )
        (row,) = matching(rows, **{"http.route": "/burn/task"})
        assert row["cpu_ns"] >= 4 * BURN_NS * 0.9


def test_a_probed_request_under_trio_is_answered() -> None:
    pytest.importorskip("hypercorn")
    pytest.importorskip("trio")
    # Ready when "/" answers: that request is probed (sample=1.0), so the bug shows as a
    # server that never becomes ready, or as a 500 here.
    with asgi_server("adv_asgi:plain", server="hypercorn", loop="trio") as service:
        status, body = request(service.port, "/charged")
        assert status == 200
        assert json.loads(body)["library"] == "trio"


def test_timer_only_requests_under_trio_are_counted() -> None:
    """Timer only (never probed), the middleware works under trio."""
    pytest.importorskip("hypercorn")
    pytest.importorskip("trio")
    with asgi_server("adv_asgi:plain_timer", server="hypercorn", loop="trio") as service:
        for _ in range(3):
            assert request(service.port, "/") == (200, b"plain")
        status, body = request(service.port, "/charged")
        answer = json.loads(body)
        assert status == 200 and answer["library"] == "trio"
        assert sum(row["count"] for row in answer["rows"]) == 3
        assert sum(row["active"] or 0 for row in answer["rows"]) == 1  # this request


def test_hypercorn_serves_the_middleware_itself_as_asgi() -> None:
    pytest.importorskip("hypercorn")
    with asgi_server("adv_asgi:plain_middleware", server="hypercorn", loop="asyncio") as service:
        assert request(service.port, "/") == (200, b"plain")


def test_a_class_application_keeping_send_is_served() -> None:
    servers.require_modules("uvicorn")
    with asgi_server("adv_asgi:class_app") as service:
        assert request(service.port, "/") == (200, b"class")


# --- WSGI under real gunicorn ----------------------------------------------------------


@pytest.fixture(scope="module")
def flask_gthread() -> Iterator[servers.Service]:
    servers.require_modules("flask", "gunicorn")
    with servers.gunicorn(
        "adv_wsgi:app", args=["--worker-class", "gthread", "--threads", "4"]
    ) as service:
        yield service


def test_gthread_requests_are_counted_once_each_under_concurrency(flask_gthread) -> None:
    port = flask_gthread.port
    before = counted(port, **{"http.route": "/items/<int:item_id>"})
    result = servers.load(flask_gthread.url("/items/7"), 400, concurrency=8)
    assert result.ok == 400, result.failures[:3]
    rows = settle(
        port,
        "400 concurrent requests",
        lambda rows: (
            sum(r["count"] for r in matching(rows, **{"http.route": "/items/<int:item_id>"}))
            >= before + 400
        ),
    )
    assert sum(r["count"] for r in matching(rows, **{"http.route": "/items/<int:item_id>"})) == (
        before + 400
    )
    assert in_flight(rows) == 0


def test_flask_failures_404s_and_streams(flask_gthread) -> None:
    port = flask_gthread.port
    assert request(port, "/boom")[0] == 500
    assert request(port, "/nowhere/at/all")[0] == 404
    assert request(port, "/stream") == (200, b"chunk0\nchunk1\nchunk2\n")
    rows = settle(
        port,
        "the failure, the 404 and the stream",
        lambda rows: (
            matching(rows, **{"http.route": "/boom"})
            and matching(rows, **{"http.response.status_code": 404})
            and matching(rows, **{"http.route": "/stream"})
        ),
    )
    (failed,) = matching(rows, **{"http.route": "/boom"})
    # Flask answers the exception itself, with a 500: the error is the status it sent.
    assert failed["attributes"]["http.response.status_code"] == 500
    assert failed["attributes"]["error.type"] == "500"
    (not_found,) = matching(rows, **{"http.response.status_code": 404})
    assert "http.route" not in not_found["attributes"]
    assert in_flight(rows) == 0


def test_a_file_response_is_sent_whole(flask_gthread) -> None:
    status, body = request(flask_gthread.port, "/file")
    assert status == 200 and body == b"0123456789abcdef" * 4096


def sent_with_sendfile(port: int, count: int) -> int:
    """The worker's count of responses sent with sendfile once it reaches ``count``: the
    count rises after sendfile(2) returns, which can be after the client has read the file
    and asked again (another of the worker's threads answers)."""
    return servers.wait_for(  # type: ignore[no-any-return]
        lambda: (sent := int(request(port, "/sendfiles")[1])) >= count and sent,
        what=f"{count} responses sent with sendfile",
        timeout=10,
    )


def test_a_file_response_is_still_sent_with_sendfile(flask_gthread) -> None:
    port = flask_gthread.port
    before = int(request(port, "/sendfiles")[1])
    for _ in range(3):
        assert request(port, "/file")[0] == 200
    assert sent_with_sendfile(port, before + 3) == before + 3


def test_without_meterage_gunicorn_sends_files_with_sendfile() -> None:
    """The control for the test above: the same application, unmetered."""
    servers.require_modules("flask", "gunicorn")
    with servers.gunicorn(
        "adv_wsgi:unmetered", args=["--worker-class", "gthread", "--threads", "4"]
    ) as service:
        for _ in range(3):
            assert request(service.port, "/file")[0] == 200
        assert sent_with_sendfile(service.port, 3) == 3


# --- the ASGI awaitable's protocol, in-process -----------------------------------------

SCOPE = {
    "type": "http",
    "method": "GET",
    "scheme": "http",
    "http_version": "1.1",
    "path": "/",
    "headers": [],
}


@pytest.fixture
def tracking() -> Iterator[None]:
    """Calls in flight are counted (as ``meterage.otel.attach`` switches on)."""
    meterage._native.set_active_tracking(True)
    yield
    meterage._native.set_active_tracking(False)


def requests_in_flight() -> int:
    return sum(s.active or 0 for s in meterage.snapshot() if s.operation == OPERATION)


def outcomes() -> dict[tuple[Any, Any], int]:
    """(status, error.type) -> requests recorded."""
    found: dict[tuple[Any, Any], int] = {}
    for s in meterage.snapshot():
        if s.operation == OPERATION and s.count:
            key = (s.attributes.get("http.response.status_code"), s.attributes.get("error.type"))
            found[key] = found.get(key, 0) + s.count
    return found


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"abc", "more_body": False}


async def _send(message: Any) -> None:
    pass


async def answer(send: Any, status: int = 200, body: bytes = b"ok") -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": body})


def outcome(run: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("returned", run())
    except BaseException as error:
        return ("raised", (type(error), str(error)))


def bare_and_metered(make_app: Callable[[], Any], drive: Callable[[Any], Any], **settings: Any):
    """What driving the application gives without and with the middleware."""
    bare = outcome(lambda: drive(make_app()))
    metered = outcome(lambda: drive(AsgiMiddleware(make_app(), **settings)))
    return bare, metered


def run_request(app: Any, receive: Any = _receive, send: Any = _send) -> Any:
    """The application called and awaited in a running loop, as a server does."""

    async def serve() -> Any:
        return await app(dict(SCOPE), receive, send)

    return asyncio.run(serve())


def test_servers_see_a_coroutine_function_and_its_explicit_call_meters_once(tracking) -> None:
    """Calling the middleware runs no Python frame of its own (its class inherits the
    native call); what servers inspect, ``app.__call__``, is a coroutine function that
    meters the request as calling the middleware does."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await answer(send, 201)

    middleware = AsgiMiddleware(app)
    assert inspect.iscoroutinefunction(middleware.__call__)  # hypercorn, asgiref
    assert asyncio.iscoroutinefunction(middleware.__call__)  # uvicorn before 3.12
    assert "__call__" not in vars(AsgiMiddleware)  # the native call slot is inherited
    assert run_request(middleware.__call__) is None
    assert run_request(middleware) is None
    assert outcomes() == {(201, None): 2}


def test_a_subclass_that_skips_the_middlewares_init_raises_clearly() -> None:
    class Careless(AsgiMiddleware):
        def __init__(self, app: Any) -> None:
            self.app = app

    class CarelessWsgi(WsgiMiddleware):
        def __init__(self, app: Any) -> None:
            self.app = app

    with pytest.raises(RuntimeError, match=r"ASGI MeterageMiddleware.*__init__"):
        Careless(_send)(dict(SCOPE), _receive, _send)
    with pytest.raises(RuntimeError, match=r"WSGI MeterageMiddleware.*__init__"):
        CarelessWsgi(lambda environ, start_response: [])({}, lambda *args: None)
    middleware = AsgiMiddleware(_send)
    with pytest.raises(RuntimeError, match="initialized already"):
        middleware._set_requests(middleware._requests)


def test_a_copied_middleware_serves_and_meters_its_requests(tracking) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await answer(send, 202)

    def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("203 Non-Authoritative Information", [])
        return [b"copied"]

    assert run_request(copy.copy(AsgiMiddleware(app))) is None
    body = copy.copy(WsgiMiddleware(wsgi_app))(
        {"REQUEST_METHOD": "GET", "wsgi.url_scheme": "http"}, lambda *args: None
    )
    assert list(body) == [b"copied"]
    body.close()
    assert outcomes() == {(202, None): 1, (203, None): 1}


def test_middlewares_no_longer_referenced_are_collected() -> None:
    """A middleware and its native meter hold each other (the meter calls back into the
    middleware): the garbage collector frees them together."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await answer(send)

    asgi, wsgi = AsgiMiddleware(app), WsgiMiddleware(lambda environ, start_response: [])
    run_request(asgi)
    gone = [weakref.ref(asgi), weakref.ref(wsgi)]
    del asgi, wsgi
    gc.collect()
    assert [ref() for ref in gone] == [None, None]


def test_requests_with_and_without_their_own_attributes_keep_their_series(tracking) -> None:
    """Requests with only a route and status end in the series remembered for the last
    such request; ones whose handler set an attribute, that failed, or of another method
    do not, and a reset starts every series again."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        kind = scope["path"].strip("/")
        await receive()  # a body of 3 bytes
        if kind == "tenant":
            meterage.current_call().set_attribute("tenant", "acme")
        if kind == "fail":
            raise ValueError("fails")
        await answer(send, 200, b"x" * len(kind))

    middleware = AsgiMiddleware(app)

    async def serve(kinds: list[str]) -> None:
        for kind in kinds:
            scope = {**SCOPE, "path": f"/{kind}"}
            if kind == "post":
                scope["method"] = "POST"
            with contextlib.suppress(ValueError):
                await middleware(scope, _receive, _send)

    def series() -> dict[tuple[Any, ...], tuple[int, float, float]]:
        received = meterage.histogram("http.server.request.body.size")
        sent = meterage.histogram("http.server.response.body.size")
        return {
            (
                s.attributes["http.request.method"],
                s.attributes.get("tenant"),
                s.attributes.get("error.type"),
            ): (
                s.count,
                received.snapshot(dict(s.attributes)).sum,
                sent.snapshot(dict(s.attributes)).sum,
            )
            for s in meterage.snapshot()
            if s.operation == OPERATION and s.count
        }

    kinds = ["plain", "tenant", "plain", "fail", "post", "plain", "tenant", "post"] * 25
    asyncio.run(serve(kinds))
    expected = {
        ("GET", None, None): (75, 75 * 3.0, 75 * 5.0),
        ("GET", "acme", None): (50, 50 * 3.0, 50 * 6.0),
        ("GET", None, "ValueError"): (25, 25 * 3.0, 0.0),
        ("POST", None, None): (50, 50 * 3.0, 50 * 4.0),
    }
    assert series() == expected
    meterage.reset()
    asyncio.run(serve(kinds[:8]))
    assert series() == {key: (n // 25, a / 25, b / 25) for key, (n, a, b) in expected.items()}


def test_a_routes_only_template_is_found_once_and_a_twice_mounted_ones_each_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Starlette's routes in process: the template of a route mounted once is kept by
    its route object after its first request; a route mounted twice has its template
    chosen by each request's path."""
    starlette = pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    from meterage import _routes

    asked: list[str] = []
    find = _routes.template_and_whether_only

    def counting(scope: Any, application: Any) -> tuple[str | None, bool]:
        asked.append(scope["path"])
        return find(scope, application)

    monkeypatch.setattr(_routes, "template_and_whether_only", counting)

    async def thing(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/things/{thing}", thing)])
    app = Starlette(
        routes=[Route("/items/{item}", thing), Mount("/v1", inner), Mount("/v2", inner)]
    )
    app.add_middleware(AsgiMiddleware, probes=())

    async def serve(paths: list[str]) -> None:
        sent: list[Any] = []

        async def send(message: Any) -> None:
            sent.append(message)

        for path in paths:
            scope = {**SCOPE, "path": path, "raw_path": path.encode(), "query_string": b""}
            await app(scope, _receive, send)
        assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [200] * len(
            paths
        )

    paths = ["/items/1", "/v1/things/2", "/v2/things/3"] * 4
    asyncio.run(serve(paths))
    assert asked.count("/items/1") == 1, starlette.__version__
    assert [path for path in asked if path != "/items/1"] == [p for p in paths if p != "/items/1"]
    counts = collections.Counter()
    for s in meterage.snapshot():
        if s.operation == OPERATION and s.count:
            counts[s.attributes.get("http.route")] += s.count
    assert counts == {"/items/{item}": 4, "/v1/things/{thing}": 4, "/v2/things/{thing}": 4}


class _NoThrowIterator:
    """An awaitable's iterator with only __next__ (no send, throw or close): legal, and
    what `await` copes with (a throw into it is raised at the await)."""

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future

    def __iter__(self) -> _NoThrowIterator:
        return self

    def __next__(self) -> Any:
        if not self.future.done():
            self.future._asyncio_future_blocking = True
            return self.future
        raise StopIteration(None)


class _NoThrowAwaitable:
    def __init__(self) -> None:
        self.future = asyncio.get_running_loop().create_future()

    def __await__(self) -> _NoThrowIterator:
        return _NoThrowIterator(self.future)


def test_cancelling_an_awaitable_without_throw_raises_the_cancellation(tracking) -> None:
    async def cancel(app: Any) -> str:
        task = asyncio.ensure_future(app(dict(SCOPE), _receive, _send))
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except BaseException as error:
            return type(error).__name__
        return "no error"

    def app(scope: Any, receive: Any, send: Any) -> Any:
        return _NoThrowAwaitable()

    assert asyncio.run(cancel(app)) == "CancelledError"
    assert asyncio.run(cancel(AsgiMiddleware(app))) == "CancelledError"
    assert requests_in_flight() == 0


def test_an_application_returning_a_non_awaitable_raises_awaits_error() -> None:
    def make_app() -> Any:
        return lambda scope, receive, send: None

    bare, metered = bare_and_metered(make_app, run_request)
    assert bare[0] == "raised" and bare[1][0] is TypeError
    assert metered[0] == "raised" and metered[1][0] is TypeError


def test_an_awaitable_with_a_send_attribute_is_awaited_through_its_await() -> None:
    class ClassApp:
        def __init__(self, scope: Any, receive: Any, send: Any) -> None:
            self.send = send

        def __await__(self) -> Any:
            return answer(self.send).__await__()

    sent: list[Any] = []

    class Sent:
        def __await__(self) -> Any:
            return iter(())

    def send(message: Any) -> Any:  # an awaitable that is no coroutine: nothing to warn
        sent.append(message)
        return Sent()

    run_request(AsgiMiddleware(ClassApp), send=send)
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]


def test_open_call_steps_awaits_an_awaitable_with_a_send_attribute(unique) -> None:
    class Awaitable:
        def __init__(self) -> None:
            self.sent: list[Any] = []
            self.send = self.sent.append  # a plain attribute, not a generator's send

        def __await__(self) -> Any:
            return asyncio.sleep(0, "awaited").__await__()

    call = meterage.meter(unique("steps")).open()

    async def main() -> Any:
        # Under the bug its send() returns None, a bare yield, again and again: the task
        # spins forever (bounded here).
        return await asyncio.wait_for(call.steps(Awaitable()), 2)

    assert asyncio.run(main()) == "awaited"
    call.finish()


def _serve_paths(app: Any, paths: list[str]) -> list[int]:
    """The statuses of GET requests to ``paths``, the application awaited in process."""
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def serve() -> None:
        for path in paths:
            scope = {**SCOPE, "path": path, "raw_path": path.encode(), "query_string": b""}
            await app(scope, _receive, send)

    asyncio.run(serve())
    return [m["status"] for m in sent if m["type"] == "http.response.start"]


def _routes_recorded() -> dict[Any, int]:
    counts: collections.Counter[Any] = collections.Counter()
    for s in meterage.snapshot():
        if s.operation == OPERATION and s.count:
            counts[
                (s.attributes.get("http.route"), s.attributes.get("http.response.status_code"))
            ] += s.count
    return dict(counts)


def test_routes_are_found_through_middlewares_the_meter_wraps_and_a_mounts_404_has_none(
    tracking,
) -> None:
    pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.middleware.gzip import GZipMiddleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    inner = Starlette(routes=[Route("/hello/{n}", hello)])
    app = Starlette(
        routes=[
            Route("/top", hello),
            Mount("/sub", inner),
            Mount("/zipped", app=GZipMiddleware(inner)),  # a sub-application in a middleware
        ]
    )
    wrapped = AsgiMiddleware(GZipMiddleware(app), probes=())
    paths = ["/sub/hello/1", "/sub/hello/2", "/top", "/sub/nope", "/nowhere"]
    paths += ["/zipped/hello/3", "/zipped/nope"]
    assert _serve_paths(wrapped, paths) == [200, 200, 200, 404, 404, 200, 404]
    assert _routes_recorded() == {
        ("/sub/hello/{n}", 200): 2,
        ("/top", 200): 1,
        ("/zipped/hello/{n}", 200): 1,
        (None, 404): 3,
    }
    assert requests_in_flight() == 0


def test_a_websocket_session_whose_attributes_function_raises_ends_its_call(tracking) -> None:
    def refuse(scope: Any) -> dict[str, str]:
        raise PermissionError("no tenant")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "websocket.close"})

    scope = {**SCOPE, "type": "websocket", "scheme": "ws"}
    middleware = AsgiMiddleware(app, attributes=refuse)
    for _ in range(3):
        with pytest.raises(PermissionError, match="no tenant"):
            asyncio.run(middleware(dict(scope), _receive, _send))
    sessions = [s for s in meterage.snapshot() if s.operation == "websocket.server.session"]
    assert [(s.count, s.attributes.get("error.type")) for s in sessions if s.count] == [
        (3, "PermissionError")
    ]
    assert sum(s.active or 0 for s in sessions) == 0


def test_a_charged_task_cancelled_before_it_ran_leaves_no_never_awaited_warning(
    tracking,
) -> None:
    """A task a probed request creates runs a coroutine of meterage's around the one it was
    given; cancelled before its first step, the one given must be closed, not left to warn
    (as it does not warn without meterage)."""

    async def work() -> None:
        await asyncio.sleep(0)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        asyncio.get_running_loop().create_task(work()).cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(work(), 0)
        await asyncio.sleep(0)
        await answer(send)

    def warnings_of(application: Any) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_request(application)
            gc.collect()
        return [str(w.message) for w in caught if "never awaited" in str(w.message)]

    assert warnings_of(app) == []
    assert warnings_of(AsgiMiddleware(app, sample=1.0)) == []
    assert outcomes() == {(200, None): 1} and requests_in_flight() == 0


def test_a_file_sent_by_pathsend_is_counted_in_the_response_size(tracking, tmp_path) -> None:
    """Servers that offer the ``http.response.pathsend`` extension send the file
    themselves (Starlette's FileResponse uses it where it is offered)."""
    path = tmp_path / "file.bin"
    path.write_bytes(b"z" * 12_345)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": str(path)})

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message["type"])

    scope = {**SCOPE, "extensions": {"http.response.pathsend": {}}}
    asyncio.run(AsgiMiddleware(app, sample=1.0)(scope, _receive, send))
    assert sent == ["http.response.start", "http.response.pathsend"]
    (series,) = [s for s in meterage.snapshot() if s.operation == OPERATION and s.count]
    size = meterage.histogram("http.server.response.body.size").snapshot(dict(series.attributes))
    assert (size.count, size.sum) == (1, 12_345.0)


def test_a_request_that_returns_after_catching_its_cancellation_has_no_status(
    tracking,
) -> None:
    """Caught and returned from, a cancellation ends the request as a return does: no
    status (none was sent) and no error (none left the application)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return

    async def serve(application: Any) -> tuple[bool, Any]:
        task = asyncio.get_running_loop().create_task(application(dict(SCOPE), _receive, _send))
        await asyncio.sleep(0)
        task.cancel()
        return task.cancelled(), await task

    assert asyncio.run(serve(app)) == asyncio.run(serve(AsgiMiddleware(app, sample=1.0)))
    assert outcomes() == {(None, None): 1} and requests_in_flight() == 0


def test_a_websocket_scope_with_a_bytes_scheme_still_runs_the_application() -> None:
    ran: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(scope["type"])
        await send({"type": "websocket.close"})

    scope = {**SCOPE, "type": "websocket", "scheme": b"wss"}
    asyncio.run(AsgiMiddleware(app)(scope, _receive, _send))
    assert ran == ["websocket"]


def test_a_probed_request_driven_by_trio_is_answered() -> None:
    trio = pytest.importorskip("trio")
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await answer(send)

    trio.run(AsgiMiddleware(app, sample=1.0), dict(SCOPE), _receive, send)
    assert len(sent) == 2


class _Mapping(collections.abc.MutableMapping):  # type: ignore[type-arg]
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def __delitem__(self, key: str) -> None:
        del self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


@pytest.mark.parametrize(
    "scope",
    [
        {**SCOPE, "method": b"GET"},
        {**SCOPE, "scheme": b"https"},
        {**SCOPE, "http_version": 2},
        {**SCOPE, "method": "X" * 1_000_000},
        {"type": "http"},
        {**SCOPE, "type": "lifespan"},
        {**SCOPE, "type": b"http"},
        {**SCOPE, "scheme": type("Scheme", (str,), {})("https")},
    ],
    ids=[
        "bytes-method",
        "bytes-scheme",
        "int-version",
        "huge-method",
        "no-keys",
        "lifespan",
        "bytes-type",
        "str-subclass",
    ],
)
def test_odd_scopes_reach_the_application_unchanged(scope: dict[str, Any], tracking) -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)
        await answer(send)

    asyncio.run(AsgiMiddleware(app, sample=1.0)(scope, _receive, _send))
    asyncio.run(AsgiMiddleware(app, sample=1.0)(_Mapping(dict(scope)), _receive, _send))
    assert seen[0] is scope and isinstance(seen[1], _Mapping)
    assert requests_in_flight() == 0


def _app_raising_when_called(scope: Any, receive: Any, send: Any) -> Any:
    raise LookupError("when called")


async def _app_raising_before_start(scope: Any, receive: Any, send: Any) -> None:
    raise LookupError("before start")


async def _app_raising_after_body(scope: Any, receive: Any, send: Any) -> None:
    await answer(send, 201)
    raise RuntimeError("after body")


async def _app_reading(scope: Any, receive: Any, send: Any) -> None:
    message = await receive()
    await answer(send, body=message["body"])


async def _app_streaming(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
    for chunk in (b"a", b"bb", b"ccc"):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    await send({"type": "http.response.trailers", "headers": [], "more_trailers": False})


async def _app_pathsend(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.pathsend", "path": "/etc/hostname"})


def _app_future(scope: Any, receive: Any, send: Any) -> Any:
    future = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(future.set_result, "from a future")
    return future


class _AwaitableApp:
    def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        return self._Awaitable(send)

    class _Awaitable:
        def __init__(self, send: Any) -> None:
            self._respond = send

        def __await__(self) -> Any:
            return answer(self._respond, 202).__await__()


async def _send_raising(message: Any) -> None:
    raise OSError("client gone")


def _send_raising_now(message: Any) -> Any:
    raise OSError("raised by send itself")


async def _receive_raising() -> Any:
    raise OSError("receive failed")


@pytest.mark.parametrize(
    ("app", "receive", "send", "expected"),
    [
        (_app_raising_when_called, _receive, _send, {(500, "LookupError"): 1}),
        (_app_raising_before_start, _receive, _send, {(500, "LookupError"): 1}),
        (_app_raising_after_body, _receive, _send, {(201, "RuntimeError"): 1}),
        (_app_reading, _receive, _send, {(200, None): 1}),
        (_app_streaming, _receive, _send, {(200, None): 1}),
        (_app_pathsend, _receive, _send, {(200, None): 1}),
        (_app_future, _receive, _send, {(None, None): 1}),
        (_AwaitableApp(), _receive, _send, {(202, None): 1}),
        (_app_reading, _receive, _send_raising, {(200, "OSError"): 1}),
        (_app_reading, _receive, _send_raising_now, {(200, "OSError"): 1}),
        (_app_reading, _receive_raising, _send, {(500, "OSError"): 1}),
    ],
    ids=[
        "raises-when-called",
        "raises-before-start",
        "raises-after-body",
        "reads-body",
        "more-body-and-trailers",
        "pathsend",
        "future",
        "custom-awaitable",
        "send-raises",
        "send-raises-synchronously",
        "receive-raises",
    ],
)
def test_the_application_outcome_is_unchanged_and_recorded_once(
    app: Any, receive: Any, send: Any, expected: dict, tracking
) -> None:
    bare = outcome(lambda: run_request(app, receive, send))
    metered = outcome(lambda: run_request(AsgiMiddleware(app, sample=1.0), receive, send))
    assert metered == bare
    gc.collect()
    assert outcomes() == expected
    assert requests_in_flight() == 0


def test_a_request_abandoned_mid_flight_ends(tracking) -> None:
    """The loop is closed with the request's task pending, and everything dropped."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.get_running_loop().create_future()  # never resolved

    loop = asyncio.new_event_loop()

    async def start() -> None:
        # Held by the loop only: dropped with it.
        loop.create_task(AsgiMiddleware(app, sample=1.0)(dict(SCOPE), _receive, _send))  # noqa: RUF006
        await asyncio.sleep(0.01)

    loop.run_until_complete(start())
    assert requests_in_flight() == 1
    loop.close()
    del start
    gc.collect()
    assert requests_in_flight() == 0
    assert outcomes() == {(200, None): 1}


def test_closed_never_awaited_awaited_twice(tracking) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await answer(send, 204, b"")

    middleware = AsgiMiddleware(app, sample=1.0)
    middleware(dict(SCOPE), _receive, _send).close()  # closed before it started
    never = middleware(dict(SCOPE), _receive, _send)
    with warnings.catch_warnings():
        # Before 3.12 __call__ is an async def: never awaited, it warns as any coroutine.
        warnings.simplefilter("ignore", RuntimeWarning)
        del never  # never awaited
        gc.collect()
    assert outcomes() == {} and requests_in_flight() == 0

    twice = middleware(dict(SCOPE), _receive, _send)

    async def await_twice() -> None:
        await twice
        await twice

    with pytest.raises(RuntimeError):
        asyncio.run(await_twice())  # as a coroutine awaited twice
    assert outcomes() == {(204, None): 1} and requests_in_flight() == 0


def test_cancellation_and_timeouts_leave_nothing_in_flight(tracking) -> None:
    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(10)

    async def silent(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(10)

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(
                AsgiMiddleware(slow, sample=1.0)(dict(SCOPE), _receive, _send), 0.02
            )
        task = asyncio.ensure_future(
            AsgiMiddleware(silent, sample=1.0)(dict(SCOPE), _receive, _send)
        )
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    # Cancelled: an answered one keeps its status; one cancelled before it answered has none
    # (not a 500).
    assert outcomes() == {(200, "CancelledError"): 1, (None, "CancelledError"): 1}
    assert requests_in_flight() == 0


def test_work_outliving_its_request_changes_nothing(tracking) -> None:
    """A task and a to_thread function still running after the response: their results
    are the application's, the call they see has ended, and the request counts once."""
    later: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async def task() -> str:
            await asyncio.sleep(0.05)
            later["call"] = meterage.current_call()
            return "task result"

        def in_thread() -> str:
            time.sleep(0.05)
            return "thread result"

        later["task"] = asyncio.create_task(task())
        later["thread"] = asyncio.ensure_future(asyncio.to_thread(in_thread))
        await answer(send)

    async def main() -> tuple[str, str]:
        await AsgiMiddleware(app, sample=1.0)(dict(SCOPE), _receive, _send)
        return await later["task"], await later["thread"]

    assert asyncio.run(main()) == ("task result", "thread result")
    assert later["call"].ended
    assert outcomes() == {(200, None): 1} and requests_in_flight() == 0


def test_an_ended_requests_call_keeps_its_status(tracking) -> None:
    """Read after the request, its call's attributes hold the status its end gave it, whether
    the series was found by the attributes (the first) or remembered (the later ones)."""
    calls: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(meterage.current_call())
        await answer(send, status=201 if scope["path"] == "/made" else 200)

    middleware = AsgiMiddleware(app, sample=1.0)

    async def main() -> None:
        for path in ("/", "/", "/made", "/", "/made"):
            await middleware(dict(SCOPE, path=path), _receive, _send)

    asyncio.run(main())
    statuses = [call.attributes.get("http.response.status_code") for call in calls]
    assert statuses == [200, 200, 201, 200, 201]
    assert all(call.ended and call.attributes["http.request.method"] == "GET" for call in calls)


def test_many_event_loops_in_threads_at_once(tracking) -> None:
    middleware = AsgiMiddleware(_app_reading, sample=1.0)

    def one_loop(_: int) -> None:
        async def main() -> None:
            await asyncio.gather(*(middleware(dict(SCOPE), _receive, _send) for _ in range(50)))

        asyncio.run(main())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one_loop, range(16)))
    assert outcomes() == {(200, None): 800} and requests_in_flight() == 0


def test_attributes_functions_that_fail_fail_the_request(tracking) -> None:
    """The attributes= function is application code: its errors are the request's."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await answer(send)

    def raising(scope: Any) -> Any:
        raise KeyError("tenant")

    for attributes, error in (
        (raising, KeyError),
        (lambda scope: ["not", "a", "mapping"], TypeError),
        (lambda scope: {"tenant": object()}, TypeError),
        (lambda scope: {1: "key"}, TypeError),
    ):
        with pytest.raises(error):
            run_request(AsgiMiddleware(app, attributes=attributes, sample=1.0))
    assert requests_in_flight() == 0
    assert sum(outcomes().values()) == 4


# --- OpenCall, in-process --------------------------------------------------------------


def burn(ns: int) -> None:
    began = time.thread_time_ns()
    while time.thread_time_ns() - began < ns:
        pass


def cpu_of(operation: str) -> float:
    (series,) = [s for s in meterage.snapshot() if s.operation == operation]
    return series.histograms["cpu.time"].sum  # type: ignore[no-any-return]


def test_a_run_inside_a_run_of_the_same_call_is_charged_once(unique) -> None:
    name = unique("nested")
    call = meterage.meter(name, probes=("cpu",), sample=1.0).open(probe=True)
    call.run(lambda: call.run(burn, 50_000_000))
    call.finish()
    assert cpu_of(name) < 0.065


def test_a_run_inside_the_calls_own_steps_is_charged_once(unique) -> None:
    name = unique("steps")
    call = meterage.meter(name, probes=("cpu",), sample=1.0).open(probe=True)

    async def handler() -> None:
        call.run(burn, 50_000_000)

    async def main() -> None:
        await call.steps(handler())

    asyncio.run(main())
    call.finish()
    assert cpu_of(name) < 0.065


def test_steps_leave_the_current_call_to_the_code_that_opened_it(unique) -> None:
    # steps() meters a coroutine's steps as the call's; it does not make the call current
    # (an async generator's call, stepped the same way, must not hide the request's): the
    # middlewares and jobs set the current call for their requests and jobs themselves.
    call = meterage.meter(unique("current"), probes=()).open()

    async def handler() -> Any:
        return meterage.current_call()

    async def main() -> Any:
        return await call.steps(handler())

    assert asyncio.run(main()) is None
    variable = meterage._native.current_call_var()

    async def opened() -> Any:
        token = variable.set(call)
        try:
            return await call.steps(handler())
        finally:
            variable.reset(token)

    assert asyncio.run(opened()) is call
    call.finish()


def test_a_run_of_another_call_inside_a_run(unique) -> None:
    outer_name, inner_name = unique("outer"), unique("inner")
    outer = meterage.meter(outer_name, probes=("cpu",), sample=1.0).open(probe=True)
    inner = meterage.meter(inner_name, probes=("cpu",), sample=1.0).open(probe=True)
    seen = []

    def inside() -> str:
        seen.append(meterage.current_call())
        burn(20_000_000)
        return "inner"

    assert outer.run(lambda: (seen.append(meterage.current_call()), inner.run(inside))[1]) == (
        "inner"
    )
    assert seen == [outer, inner] and meterage.current_call() is None
    inner.finish()
    outer.finish()
    assert 0.018 < cpu_of(inner_name) < 0.03 and 0.018 < cpu_of(outer_name) < 0.03


def test_run_in_another_thread_during_finish_returns_its_result(unique) -> None:
    name = unique("finishing")
    sizes = meterage.histogram(unique("sizes"))
    call = meterage.meter(name, probes=("cpu",), sample=1.0).open(probe=True)
    ran = threading.Event()
    result: dict[str, Any] = {}

    def work() -> str:
        ran.set()
        time.sleep(0.1)
        return "done"

    def worker() -> None:
        result.update(outcome=outcome(lambda: call.run(work)))

    def values() -> Iterator[Any]:
        time.sleep(0.2)  # the worker's run ends meanwhile
        yield (sizes, 1.0)

    thread = threading.Thread(target=worker)
    thread.start()
    assert ran.wait(5)
    call.finish(values=values())
    thread.join()
    assert result["outcome"] == ("returned", "done")


def test_finish_from_another_thread_while_a_run_is_in_progress(unique) -> None:
    name = unique("finished.elsewhere")
    call = meterage.meter(name, probes=("cpu",), sample=1.0).open(probe=True)
    started = threading.Event()

    def work() -> str:
        started.set()
        burn(30_000_000)
        return "value"

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(call.run, work)
        assert started.wait(5)
        call.finish()
        assert future.result() == "value"
    (series,) = [s for s in meterage.snapshot() if s.operation == name]
    assert series.count == 1
    with pytest.raises(RuntimeError):
        call.set_attribute("late", 1)
    assert call.run(lambda: "after the end") == "after the end"


def test_steps_across_threads_sum_each_threads_work(unique) -> None:
    name = unique("threads")
    call = meterage.meter(name, probes=("cpu",), sample=1.0).open(probe=True)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: call.run(burn, 10_000_000), range(8))) == [None] * 8
    call.finish()
    assert 0.078 < cpu_of(name) < 0.1


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        (1, "v", TypeError),
        ("", "v", ValueError),
        (b"k", "v", TypeError),
        ("k", None, TypeError),
        ("k", [1], TypeError),
        ("k", object(), TypeError),
        ("k", 2**70, ValueError),
    ],
)
def test_bad_attributes_raise_clearly_and_record_nothing_wrong(
    unique, key: Any, value: Any, error: type
) -> None:
    name = unique("bad")
    call = meterage.meter(name, probes=()).open()
    with pytest.raises(error):
        call.set_attribute(key, value)
    with pytest.raises(error):
        call.set_attributes({key: value})
    call.run(lambda: None)
    call.finish()
    (series,) = [s for s in meterage.snapshot() if s.operation == name]
    assert series.attributes == {} and series.count == 1


def test_current_call_in_generator_context_managers_and_nested_calls(unique) -> None:
    outer = meterage.meter(unique("outer"), probes=()).open()
    inner = meterage.meter(unique("inner"), probes=()).open()

    @contextlib.contextmanager
    def stepping(call: Any) -> Iterator[Any]:
        yield call.run(meterage.current_call)

    def generator() -> Iterator[Any]:
        yield meterage.current_call()
        yield inner.run(meterage.current_call)
        yield meterage.current_call()

    with stepping(outer) as seen:
        assert seen is outer
    assert outer.run(lambda: list(generator())) == [outer, inner, outer]
    stepped = generator()
    assert outer.run(next, stepped) is outer
    assert inner.run(next, stepped) is inner  # resumed inside the other call's step
    assert next(stepped) is None
    outer.finish()
    inner.finish()


def test_fork_with_threads_stepping_an_open_call(unique, tracking) -> None:
    name = unique("fork")
    call = meterage.meter(name, probes=("cpu",), sample=1.0).open(probe=True)
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            call.run(time.sleep, 0.001)

    threads = [threading.Thread(target=spin) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.02)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.closerange(3, read)
            os.closerange(read + 1, write)
            os.closerange(write + 1, 65536)
            report = {
                "current": meterage.current_call() is None,
                "ran": call.run(lambda: 5),
            }
            call.finish()
            fresh = meterage.meter(name, probes=("cpu",), sample=1.0).open(probe=True)
            fresh.run(burn, 1_000_000)
            fresh.finish()
            report["series"] = [
                (s.count, s.active) for s in meterage.snapshot() if s.operation == name
            ]
            os.write(write, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        report = json.loads(pipe.read())
    _, status = os.waitpid(pid, 0)
    stop.set()
    for thread in threads:
        thread.join()
    assert status == 0
    # In the child the call opened before the fork records nothing; its own call counts.
    assert report == {"current": True, "ran": 5, "series": [[1, 0]]}
    call.finish()
    assert [(s.count, s.active) for s in meterage.snapshot() if s.operation == name] == [(1, 0)]


# --- WSGI edge cases, in-process -------------------------------------------------------

ENVIRON = {
    "REQUEST_METHOD": "GET",
    "PATH_INFO": "/",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "wsgi.url_scheme": "http",
}


def serve_wsgi(app: Any, environ: dict | None = None) -> tuple[list[Any], list[Any]]:
    statuses: list[Any] = []

    def start_response(status: Any, headers: Any, exc_info: Any = None) -> Any:
        statuses.append(status)
        return lambda data: None

    body = app({**ENVIRON, "wsgi.input": io.BytesIO(), **(environ or {})}, start_response)
    try:
        chunks = list(body)
    finally:
        if hasattr(body, "close"):
            body.close()
    return statuses, chunks


class _Body:
    def __init__(self, fails_in: str) -> None:
        self.fails_in = fails_in
        self.given = 0
        self.closed = False

    def __iter__(self) -> _Body:
        if self.fails_in == "iter":
            raise ValueError("in __iter__")
        return self

    def __next__(self) -> bytes:
        self.given += 1
        if self.fails_in == "next" and self.given == 2:
            raise KeyError("in __next__")
        if self.given > 3:
            raise StopIteration
        return b"x"

    def close(self) -> None:
        self.closed = True
        if self.fails_in == "close":
            raise OSError("in close")


def _wsgi_body(fails_in: str) -> Any:
    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [])
        return _Body(fails_in)

    return app


def _wsgi_generator(environ: Any, start_response: Any) -> Any:
    start_response("200 OK", [])
    yield b"a"
    yield b"b"


def _wsgi_exc_info(environ: Any, start_response: Any) -> Any:
    start_response("200 OK", [])
    try:
        raise ValueError("oops")
    except ValueError:
        start_response("503 Service Unavailable", [], sys.exc_info())
    return [b"sorry"]


def _wsgi_twice(environ: Any, start_response: Any) -> Any:
    start_response("200 OK", [])
    start_response("404 Not Found", [])
    return [b""]


def _wsgi_bytes_status(environ: Any, start_response: Any) -> Any:
    start_response(b"200 OK", [])
    return [b""]


def _wsgi_raises_after_start(environ: Any, start_response: Any) -> Any:
    start_response("200 OK", [])
    raise RuntimeError("after start_response")


def _wsgi_empty_then_raises(environ: Any, start_response: Any) -> Any:
    start_response("200 OK", [])
    yield b""  # gunicorn, wsgiref and werkzeug send the headers with it
    raise ValueError("after an empty chunk")


def _wsgi_write(environ: Any, start_response: Any) -> Any:
    start_response("200 OK", [])(b"written")
    return iter([memoryview(b"mv"), bytearray(b"ba")])


@pytest.mark.parametrize(
    ("app", "expected"),
    [
        # An error before any byte of the body: the server answers 500 (the headers of the
        # status given had not gone out).
        (_wsgi_body("iter"), {(500, "ValueError"): 1}),
        (_wsgi_body("next"), {(200, "KeyError"): 1}),
        (_wsgi_body("close"), {(200, "OSError"): 1}),
        (_wsgi_body(""), {(200, None): 1}),
        (_wsgi_generator, {(200, None): 1}),
        (_wsgi_exc_info, {(503, "503"): 1}),
        (_wsgi_twice, {(404, None): 1}),
        (_wsgi_bytes_status, {(None, None): 1}),
        (_wsgi_raises_after_start, {(500, "RuntimeError"): 1}),
        (_wsgi_write, {(200, None): 1}),
        (_wsgi_empty_then_raises, {(200, "ValueError"): 1}),
    ],
    ids=[
        "iter-raises",
        "next-raises",
        "close-raises",
        "plain-body",
        "generator",
        "exc-info",
        "start-twice",
        "bytes-status",
        "raises-after-start",
        "write-and-buffers",
        "empty-chunk-then-raises",
    ],
)
def test_wsgi_outcomes_are_unchanged_and_recorded_once(app: Any, expected: dict, tracking) -> None:
    bare = outcome(lambda: serve_wsgi(app))
    metered = outcome(lambda: serve_wsgi(WsgiMiddleware(app, sample=1.0)))
    assert metered == bare
    gc.collect()
    assert outcomes() == expected
    assert requests_in_flight() == 0


@contextlib.contextmanager
def wsgiref_server(app: Any) -> Iterator[int]:
    """The standard library's WSGI server serving ``app`` on a free loopback port."""

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    class QuietServer(wsgiref.simple_server.WSGIServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # an application's error, logged by the handler's own output otherwise

    server = wsgiref.simple_server.make_server(
        "127.0.0.1", 0, app, server_class=QuietServer, handler_class=Quiet
    )
    server.base_environ["wsgi.errors"] = io.StringIO()  # its error report, kept quiet
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def fetch(port: int, path: str = "/") -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one GET; a body cut short is what arrived."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        try:
            body = response.read()
        except http.client.IncompleteRead as cut:
            body = cut.partial
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        connection.close()


def test_a_wsgi_body_keeps_the_length_servers_read(tracking) -> None:
    """wsgiref (and waitress) set the Content-Length of a one-chunk body from len(body):
    the metered body has the application's length, and none where it has none."""

    def listed(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello world"]

    def generated(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"hello world"

    for app in (listed, generated):
        with wsgiref_server(app) as port:
            bare = fetch(port)
        with wsgiref_server(WsgiMiddleware(app, sample=1.0)) as port:
            metered = fetch(port)
        assert metered[0] == bare[0] == 200 and metered[2] == bare[2] == b"hello world"
        assert metered[1].get("content-length") == bare[1].get("content-length")
    assert outcomes() == {(200, None): 2} and requests_in_flight() == 0
    body = WsgiMiddleware(listed)(dict(ENVIRON), lambda *args: None)
    assert len(body) == 1
    body.close()
    with pytest.raises(TypeError):
        len(WsgiMiddleware(generated)(dict(ENVIRON), lambda *args: None))


def test_the_status_recorded_is_the_status_the_wsgi_server_sent(tracking) -> None:
    def raises_after_start(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [])
        raise RuntimeError("after start_response")

    def raises_after_the_first_chunk(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [])
        yield b"first"
        try:
            raise ValueError("late")
        except ValueError:
            # The headers went out with the first chunk: the server re-raises the error.
            start_response("500 Internal Server Error", [], sys.exc_info())
        yield b"never"

    sent = {}
    for app in (raises_after_start, raises_after_the_first_chunk):
        with wsgiref_server(WsgiMiddleware(app, sample=1.0)) as port:
            status, _, body = fetch(port)
        sent[app.__name__] = (status, body[:5])
    assert sent == {
        "raises_after_start": (500, b"A ser"),  # wsgiref's own error page
        "raises_after_the_first_chunk": (200, b"first"),
    }
    assert outcomes() == {(500, "RuntimeError"): 1, (200, "ValueError"): 1}
    assert requests_in_flight() == 0


def test_a_request_served_while_an_earlier_body_is_open_is_a_request_of_its_own(
    tracking,
) -> None:
    """werkzeug's test client (buffered=False, its default) closes a response only when
    it is dropped: the next request of the thread arrives with the last one's body open."""
    flask = pytest.importorskip("flask")
    app = flask.Flask("open_bodies")

    @app.get("/<name>")
    def named(name: str) -> str:
        meterage.current_call().set_attribute("name", name)
        return name

    app.wsgi_app = WsgiMiddleware(app.wsgi_app, sample=1.0)  # type: ignore[method-assign]
    client = app.test_client()
    kept = [client.get(f"/{name}") for name in ("a", "b", "c", "a", "b")]
    assert [response.get_data() for response in kept] == [b"a", b"b", b"c", b"a", b"b"]
    for response in kept:
        response.close()
    names = {
        s.attributes["name"]: s.count
        for s in meterage.snapshot()
        if s.operation == OPERATION and s.count
    }
    assert names == {"a": 2, "b": 2, "c": 1}
    assert requests_in_flight() == 0


def test_made_up_protocol_versions_and_schemes_make_no_meters_of_their_own(tracking) -> None:
    """A client can send any version on its request line (wsgiref passes it on as
    SERVER_PROTOCOL) and, behind a proxy that forwards it, any scheme: the meters stay a
    bounded set, the version left out and the scheme _OTHER where they are not real."""

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [])
        return [b"ok"]

    middleware = WsgiMiddleware(app)
    for index in range(600):
        environ = {"SERVER_PROTOCOL": f"HTTP/1.{index:05d}", "wsgi.url_scheme": f"x{index}"}
        assert serve_wsgi(middleware, environ) == (["200 OK"], [b"ok"])
    real_ones = [("HTTP/1.1", "https"), ("HTTP/2.0", "http"), ("HTTP/1.0", "http")]
    real_ones += [("HTTP/1", "HTTP")]  # granian's HTTP/1.0; a scheme forwarded upper-case
    for version, scheme in real_ones:
        serve_wsgi(middleware, {"SERVER_PROTOCOL": version, "wsgi.url_scheme": scheme})
    assert len(middleware._meters._cores) == 4
    found = {
        (s.attributes.get("url.scheme"), s.attributes.get("network.protocol.version")): s.count
        for s in meterage.snapshot()
        if s.operation == OPERATION and s.count
    }
    real = {("https", "1.1"): 1, ("http", "2"): 1, ("http", "1.0"): 2}
    assert found == {("_OTHER", None): 600, **real}


def test_a_wsgi_body_never_closed_or_dropped_ends_its_request(tracking) -> None:
    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [])
        return [b"abc"]

    middleware = WsgiMiddleware(app, sample=1.0)
    environ = {**ENVIRON, "wsgi.input": io.BytesIO()}
    body = middleware(dict(environ), lambda *args: None)
    next(iter(body))
    assert requests_in_flight() == 1
    del body  # the server dropped it unclosed
    gc.collect()
    reused = dict(environ)
    for _ in range(3):  # the same environ, reused
        body = middleware(reused, lambda *args: None)
        assert list(body) == [b"abc"]
        body.close()
        body.close()  # a second close does nothing
    assert outcomes() == {(200, None): 4} and requests_in_flight() == 0


def test_wsgi_threads_count_every_request_once(tracking) -> None:
    middleware = WsgiMiddleware(_wsgi_generator, sample=1.0)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: serve_wsgi(middleware), range(400)))
    assert all(result == (["200 OK"], [b"a", b"b"]) for result in results)
    assert outcomes() == {(200, None): 400} and requests_in_flight() == 0


def test_a_wsgi_body_closed_in_another_thread_leaves_no_open_call_behind(tracking) -> None:
    """Some servers could call the application in one thread and send its body from
    another: the request's call, made current in the first, cannot be reset from the
    second. The first then sees an ended call (as work that outlives its request does),
    never an open one, and its next requests are metered as usual."""
    seen: list[Any] = []

    def app(environ: Any, start_response: Any) -> Any:
        seen.append(meterage.current_call())
        start_response("200 OK", [])
        return iter([b"abc"])  # not a list: its chunks are steps of the request

    middleware = WsgiMiddleware(app, sample=1.0)
    environ = {**ENVIRON, "wsgi.input": io.BytesIO()}
    left: list[Any] = []

    def calls_the_application(sender: ThreadPoolExecutor) -> None:
        # The thread's own context (it dies with the thread: nothing left for other tests).
        for _ in range(3):
            body = middleware(dict(environ), lambda *args: None)

            def send_and_close(body: Any = body) -> list[bytes]:
                chunks = list(body)
                body.close()
                return chunks

            assert sender.submit(send_and_close).result() == [b"abc"]
            left.append(meterage.current_call())

    with ThreadPoolExecutor(1) as sender:
        caller = threading.Thread(target=calls_the_application, args=(sender,))
        caller.start()
        caller.join()
    assert len(left) == 3 and all(call is None or call.ended for call in left)
    assert all(call is not None for call in seen) and len({id(call) for call in seen}) == 3
    assert outcomes() == {(200, None): 3} and requests_in_flight() == 0
    assert meterage.current_call() is None


# --- the event loop's task factory, in-process -------------------------------------------

TASKS_TAKE_A_CONTEXT = sys.version_info >= (3, 11)


def test_the_task_factory_makes_tasks_as_the_loop_would_and_charges_probed_calls() -> None:
    from meterage import _handoff

    seen_kwargs: list[dict[str, Any]] = []

    def previous(loop: Any, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        seen_kwargs.append(kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    variable: Any = contextvars.ContextVar("test_factory_var", default="unset")

    async def read_variable() -> str:
        return str(variable.get())

    async def main(factory_previous: Any) -> tuple[str, str, str]:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(_handoff._task_factory(factory_previous))
        # A task with its own context: as create_task(context=...) passes it on (3.11+), or
        # as a task made inside it copies it (3.10, where create_task takes no context).
        context = contextvars.copy_context()
        context.run(variable.set, "in the context")
        if TASKS_TAKE_A_CONTEXT:
            in_context = await loop.create_task(read_variable(), context=context)
        else:
            in_context = await context.run(loop.create_task, read_variable())
        named = loop.create_task(read_variable(), name="named task")
        await named
        assert named.get_loop() is loop
        # A future is not a coroutine: handed on as it is.
        future = loop.create_future()
        future.set_result("done")
        gathered = await asyncio.gather(future)
        return in_context, named.get_name(), gathered[0]

    for factory_previous in (None, previous):
        assert asyncio.run(main(factory_previous)) == ("in the context", "named task", "done")
    if TASKS_TAKE_A_CONTEXT:
        assert {"context"} <= set(seen_kwargs[0])

    # A task created while a probed call is current is charged to it.
    operation = f"test.factory.{os.getpid()}.{time.monotonic_ns()}"

    async def burn() -> None:
        began = time.thread_time_ns()
        while time.thread_time_ns() - began < 20_000_000:
            pass

    async def charged() -> None:
        asyncio.get_running_loop().set_task_factory(_handoff._task_factory(None))
        call = meterage.meter(operation, probes=("cpu",), sample=1.0).open()
        token = _handoff._CURRENT.set(call)
        try:
            await asyncio.create_task(burn())
        finally:
            _handoff._CURRENT.reset(token)
        call.finish()

    asyncio.run(charged())
    (series,) = [s for s in meterage.snapshot() if s.operation == operation]
    assert series.histograms["cpu.time"].sum >= 0.02 * 0.95
