"""meterage.asgi under a real uvicorn serving a real FastAPI application, with real HTTP
requests: each request is charged its own work exactly, under concurrency, wherever the
work runs (its coroutine, created tasks, to_thread, run_in_executor, anyio's thread pool),
and its series carries the HTTP attributes with the route template."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests_helpers
import servers
from requests_helpers import assert_charged, request, series_of

servers.require_modules("fastapi", "uvicorn")

#: What each /burn request spends (the app's BURN_NS, set through its environment).
BURN_NS = 20_000_000
REQUESTS = 32
CONCURRENCY = 16


def charged(port: int) -> list[dict[str, Any]]:
    return everything(port)["rows"]  # type: ignore[no-any-return]


def everything(port: int) -> dict[str, Any]:
    status, body = request(port, "/charged")
    assert status == 200
    return json.loads(body)  # type: ignore[no-any-return]


def settled(port: int, count: int, **attributes: Any) -> dict[str, Any]:
    return requests_helpers.settled(lambda: charged(port), count, **attributes)


@pytest.fixture(scope="module")
def service():
    env = servers._environment(None, REQUESTS_APP_BURN_NS=str(BURN_NS))
    with servers.uvicorn("requests_fastapi:app", env=env) as running:
        yield running


def charged_beside_idle(
    service: servers.Service, where: str, requests: int, concurrency: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The series of ``/burn/<where>`` and of ``/idle/<where>`` (the same route spending
    nothing), ``requests`` of each sent interleaved: the idle route's charge is the rest of
    a request's own work under the same load (framework, server, the meter's readings;
    0.3-0.9 ms here, more on a busy host), so that the burn can be told from it."""
    burn, idle = f"/burn/{where}", f"/idle/{where}"
    result = servers.load(
        [service.url(burn), service.url(idle)], 2 * requests, concurrency=concurrency, timeout=60
    )
    assert result.ok == 2 * requests, result.failures
    return (
        settled(service.port, requests, **{"http.route": burn}),
        settled(service.port, requests, **{"http.route": idle}),
    )


@pytest.mark.parametrize(
    "where", ["direct", "task", "gather", "taskgroup", "to_thread", "executor", "sync"]
)
def test_each_request_is_charged_the_cpu_it_spent_wherever_it_ran(service, where: str) -> None:
    row, idle = charged_beside_idle(service, where, REQUESTS, CONCURRENCY)
    assert row["count"] == row["sampled"] == REQUESTS
    assert_charged(row, BURN_NS, beside=idle, what=where)


def test_a_request_that_sleeps_is_charged_almost_nothing(service) -> None:
    # Run while other requests burn CPU on the same event loop.
    busy = servers.load(service.url("/burn/direct"), 8, concurrency=4, timeout=60)
    assert busy.ok == 8
    result = servers.load(service.url("/sleep"), REQUESTS, concurrency=CONCURRENCY)
    assert result.ok == REQUESTS, result.failures
    row = settled(service.port, REQUESTS, **{"http.route": "/sleep"})
    assert row["count"] == REQUESTS
    assert row["cpu_ns"] / REQUESTS < 0.05 * BURN_NS  # ~10 µs real, against 1 ms allowed


def test_a_write_through_to_thread_is_charged_its_bytes(service) -> None:
    # A first request may write more of its own: the first use of a module writes its
    # .pyc in a fresh environment, in that request's thread. Counted from after it.
    assert request(service.port, "/write")[0] == 200
    before = settled(service.port, 1, **{"http.route": "/write"})["io_write"]
    result = servers.load(service.url("/write"), REQUESTS, concurrency=CONCURRENCY)
    assert result.ok == REQUESTS, result.failures
    row = settled(service.port, 1 + REQUESTS, **{"http.route": "/write"})
    assert row["count"] == 1 + REQUESTS
    # Its 64 KiB, plus what its own threads wrote on its behalf: a few bytes waking the
    # event loop up (asyncio's self-pipe), and, under uvloop (uvicorn's loop when it is
    # installed), the response itself, which uvloop writes to the socket with write(2) in
    # the request's step (its ~150 bytes of status line, headers and body).
    written = row["io_write"] - before
    assert REQUESTS * 64 * 1024 <= written <= REQUESTS * (64 * 1024 + 512), written


def test_routes_are_templates_and_unmatched_paths_share_one_series(service) -> None:
    for path in ("/api/items/1", "/api/items/2", "/api/items/3"):
        assert request(service.port, path)[0] == 200
    for path in ("/sub/things/a", "/sub/things/b"):
        assert request(service.port, path)[0] == 200
    for path in ("/nope/1", "/nope/2", "/other"):
        assert request(service.port, path)[0] == 404
    settled(service.port, 3, **{"http.response.status_code": 404})  # the last has ended
    rows = charged(service.port)
    (items,) = series_of(rows, **{"http.route": "/api/items/{item_id}"})
    assert items["count"] == 3
    assert items["attributes"] == {
        "http.request.method": "GET",
        "url.scheme": "http",
        "network.protocol.version": "1.1",
        "http.route": "/api/items/{item_id}",
        "http.response.status_code": 200,
    }
    (things,) = series_of(rows, **{"http.route": "/sub/things/{thing_id}"})
    assert things["count"] == 2
    unmatched = [row for row in series_of(rows, **{"http.response.status_code": 404})]
    assert len(unmatched) == 1 and "http.route" not in unmatched[0]["attributes"]
    assert unmatched[0]["count"] == 3


def test_failures_carry_error_type_and_status(service) -> None:
    assert request(service.port, "/api/fail")[0] == 500
    assert request(service.port, "/api/status/503")[0] == 503
    assert request(service.port, "/api/status/404")[0] == 404
    settled(
        service.port, 1, **{"http.route": "/api/status/{code}", "http.response.status_code": 404}
    )
    assert request(service.port, "/api/items/1", method="BREW")[0] in (405, 400)
    settled(service.port, 1, **{"http.request.method": "_OTHER"})  # the last has ended
    rows = charged(service.port)
    (failed,) = series_of(rows, **{"http.route": "/api/fail"})
    assert failed["attributes"]["error.type"] == "RuntimeError"
    assert failed["attributes"]["http.response.status_code"] == 500
    (unavailable,) = series_of(
        rows, **{"http.route": "/api/status/{code}", "http.response.status_code": 503}
    )
    assert unavailable["attributes"]["error.type"] == "503"
    (not_found,) = series_of(
        rows, **{"http.route": "/api/status/{code}", "http.response.status_code": 404}
    )
    assert "error.type" not in not_found["attributes"]  # a 4xx is the client's error
    (other,) = series_of(rows, **{"http.request.method": "_OTHER"})
    assert other["count"] == 1


def test_handlers_set_attributes_on_the_current_call(service) -> None:
    for name in ("acme", "acme", "globex"):
        assert request(service.port, f"/tenant/{name}") == (200, name.encode())
    settled(service.port, 1, tenant="globex")  # the last has ended
    rows = charged(service.port)
    assert [row["count"] for row in series_of(rows, tenant="acme")] == [2]
    assert [row["count"] for row in series_of(rows, tenant="globex")] == [1]


def test_a_background_task_is_charged_to_its_request(service) -> None:
    # The tasks run after their responses: each request ends once its task has.
    row, idle = charged_beside_idle(service, "background", 8, concurrency=4)
    assert row["count"] == 8
    assert_charged(row, BURN_NS, beside=idle, what="background")


def test_body_sizes_are_recorded_in_the_requests_series(service) -> None:
    for size in (0, 1000, 100_000):
        assert request(service.port, "/upload", "POST", b"z" * size) == (200, str(size).encode())
    assert request(service.port, "/idle/stream") == (200, b"y" * 4000)
    settled(service.port, 1, **{"http.route": "/idle/stream"})
    sizes = everything(service.port)["sizes"]
    (uploads,) = [
        row
        for row in sizes["http.server.request.body.size"]
        if row["attributes"].get("http.route") == "/upload"
    ]
    assert uploads["count"] == 3 and uploads["sum"] == 101_000
    assert uploads["attributes"]["http.request.method"] == "POST"
    (streamed,) = [
        row
        for row in sizes["http.server.response.body.size"]
        if row["attributes"].get("http.route") == "/idle/stream"
    ]
    assert streamed["sum"] == 4000 * streamed["count"]


def test_a_streamed_response_is_charged_the_work_of_its_chunks(service) -> None:
    # Every request burned BURN_NS in its chunks (some in a task Starlette creates to
    # stream them).
    row, idle = charged_beside_idle(service, "stream", 16, concurrency=4)
    assert_charged(row, BURN_NS, beside=idle, what="stream")


def test_a_timeout_is_a_failure_and_nothing_stays_in_flight(service) -> None:
    assert request(service.port, "/timeout")[0] == 500
    settled(service.port, 1, **{"http.route": "/timeout"})
    rows = charged(service.port)
    (timed_out,) = series_of(rows, **{"http.route": "/timeout"})
    assert timed_out["attributes"]["error.type"] == "TimeoutError"
    assert timed_out["attributes"]["http.response.status_code"] == 500


def test_a_client_that_goes_away_leaves_no_request_in_flight(service) -> None:
    import socket

    for _ in range(4):
        with socket.create_connection(("127.0.0.1", service.port), timeout=5) as client:
            client.sendall(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        # closed before the answer: the route goes on, its answer goes nowhere
    servers.wait_for(
        lambda: (
            sum(row["count"] for row in series_of(charged(service.port), **{"http.route": "/slow"}))
            == 4
        ),
        what="the 4 abandoned requests to end",
        timeout=10,
    )
    # In flight: only the /charged request asking, counted on its meter's own series (the
    # one without a route or status; the finished requests' series count none).
    active = [(row["attributes"], row["active"]) for row in charged(service.port) if row["active"]]
    assert active == [
        (
            {
                "http.request.method": "GET",
                "url.scheme": "http",
                "network.protocol.version": "1.1",
            },
            1,
        )
    ]


def test_websocket_sessions_are_timed_with_their_messages_each_way(service) -> None:
    servers.require_modules("websockets")
    from websockets.sync.client import connect

    for room, count in (("a", 3), ("b", 5)):
        with connect(f"ws://127.0.0.1:{service.port}/ws/{room}") as socket:
            for index in range(count):
                socket.send(f"hello {index}")
                assert socket.recv(timeout=10) == socket.recv(timeout=10) == f"hello {index}"

    def both_ended() -> dict[str, Any] | None:
        found = everything(service.port)
        return found if sum(s["count"] for s in found["sessions"]) == 2 else None

    state = servers.wait_for(both_ended, what="both websocket sessions to end")
    (session,) = state["sessions"]
    assert session["attributes"]["http.route"] == "/ws/{room}"
    assert session["attributes"]["url.scheme"] == "ws"
    by_direction = {m["attributes"]["io.direction"]: m["value"] for m in state["messages"]}
    assert by_direction == {"receive": 8, "send": 16}
    # Sessions are not requests: http.server.request has none of them.
    assert not series_of(state["rows"], **{"http.route": "/ws/{room}"})
