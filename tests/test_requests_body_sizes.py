"""Body sizes and the current call under a real gunicorn serving a real Flask application:
requests that end in more series than the middleware remembers body-size series for
(each status its own series) get exactly their own sizes, across a reset too; a streamed
body is made with the request's call current, and no call is left current in the server's
thread once a request has ended."""

from __future__ import annotations

import json
from typing import Any

import pytest
import servers
from requests_helpers import request, series_of

servers.require_modules("flask", "gunicorn")

#: More statuses (each a series of its own) than the 64 remembered; 204 and 205 have no body.
STATUSES = [code for code in range(200, 300) if code not in (204, 205)]


def body_for(code: int) -> bytes:
    return b"b" * (code - 150)


@pytest.fixture(scope="module")
def service():
    # One sync worker: every request runs in the same thread, one after another.
    with servers.gunicorn("requests_bodies:application", ready_path="/sizes") as running:
        yield running


def report(port: int) -> dict[str, Any]:
    status, body = request(port, "/sizes")
    assert status == 200
    return json.loads(body)  # type: ignore[no-any-return]


def send_every_status(port: int, rounds: int) -> None:
    for _ in range(rounds):
        for code in STATUSES:
            assert request(port, f"/echo/{code}", method="POST", body=body_for(code)) == (
                code,
                body_for(code) * 2,
            )


def assert_exact_sizes(port: int, rounds: int) -> None:
    rows = report(port)["rows"]
    for code in STATUSES:
        (row,) = series_of(
            rows, **{"http.route": "/echo/<int:code>", "http.response.status_code": code}
        )
        size = len(body_for(code))
        assert row["count"] == rounds, code
        assert (row["request_count"], row["request_sum"]) == (rounds, rounds * size), code
        assert (row["response_count"], row["response_sum"]) == (rounds, rounds * 2 * size), code


def test_each_series_gets_its_own_body_sizes_across_a_reset(service) -> None:
    send_every_status(service.port, 3)
    assert_exact_sizes(service.port, 3)
    assert request(service.port, "/reset", method="POST") == (200, b"reset")
    send_every_status(service.port, 2)
    assert_exact_sizes(service.port, 2)


def test_a_streamed_body_is_made_with_its_call_current_and_none_is_left_after(service) -> None:
    for _ in range(5):
        assert request(service.port, "/stream-current") == (200, b"111")
        assert request(service.port, "/echo/201", method="POST", body=b"x") == (201, b"xx")
    assert report(service.port)["leaked"] == []
