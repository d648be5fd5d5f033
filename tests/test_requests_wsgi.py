"""meterage.wsgi under a real gunicorn serving real Flask and Django applications, with
real HTTP requests: exact cost per request (the view, a thread pool it submits to, a
streamed body), the HTTP attributes with Flask's URL rules and Django's resolved routes."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests_helpers
import servers
from requests_helpers import assert_charged, request, series_of

servers.require_modules("flask", "django", "gunicorn")

BURN_NS = 20_000_000
REQUESTS = 16


def settled(port: int, count: int, **attributes: Any) -> dict[str, Any]:
    return requests_helpers.settled(lambda: flask_charged(port)["rows"], count, **attributes)


@pytest.fixture(scope="module")
def flask_service():
    env = servers._environment(None, REQUESTS_APP_BURN_NS=str(BURN_NS))
    # One sync worker with 4 threads: concurrent requests share its process.
    with servers.gunicorn(
        "requests_flask:app", env=env, args=["--threads", "4", "--worker-class", "gthread"]
    ) as running:
        yield running


def flask_charged(port: int) -> dict[str, Any]:
    status, body = request(port, "/charged")
    assert status == 200
    return json.loads(body)  # type: ignore[no-any-return]


@pytest.mark.parametrize("where", ["", "/pool", "/stream"])
def test_each_request_is_charged_its_own_cpu(flask_service, where: str) -> None:
    # Interleaved with as many requests to the same route spending nothing: what those are
    # charged is the rest of a request's own work under the same load (Flask's, gunicorn's,
    # the meter's readings), so that the burn can be told from it.
    burn, idle = f"/burn{where}", f"/idle{where}"
    result = servers.load(
        [flask_service.url(burn), flask_service.url(idle)], 2 * REQUESTS, concurrency=4, timeout=60
    )
    assert result.ok == 2 * REQUESTS, result.failures
    row = settled(flask_service.port, REQUESTS, **{"http.route": burn})
    idle_row = settled(flask_service.port, REQUESTS, **{"http.route": idle})
    assert row["count"] == row["sampled"] == REQUESTS
    assert_charged(row, BURN_NS, beside=idle_row, what=burn)


def test_a_streamed_body_is_counted_in_full(flask_service) -> None:
    assert request(flask_service.port, "/idle/stream") == (200, b"x" * 4000)
    settled(flask_service.port, 1, **{"http.route": "/idle/stream"})
    charged = flask_charged(flask_service.port)
    (row,) = series_of(charged["rows"], **{"http.route": "/idle/stream"})
    assert charged["stream_bytes"] == 4000 * row["count"]


def test_a_write_is_charged_its_bytes(flask_service) -> None:
    for _ in range(4):
        assert request(flask_service.port, "/write")[0] == 200
    row = settled(flask_service.port, 4, **{"http.route": "/write"})
    assert row["io_write"] == row["count"] * 65536


def test_flask_routes_statuses_and_failures(flask_service) -> None:
    for path in ("/items/1", "/items/2"):
        assert request(flask_service.port, path)[0] == 200
    assert request(flask_service.port, "/nowhere/1")[0] == 404
    assert request(flask_service.port, "/nowhere/2")[0] == 404
    assert request(flask_service.port, "/fail")[0] == 500
    assert request(flask_service.port, "/status/503")[0] == 503
    assert request(flask_service.port, "/tenant/acme")[0] == 200
    settled(flask_service.port, 1, tenant="acme")  # the last request has ended
    rows = flask_charged(flask_service.port)["rows"]
    (items,) = series_of(rows, **{"http.route": "/items/<int:item_id>"})
    assert items["count"] == 2
    assert items["attributes"] == {
        "http.request.method": "GET",
        "url.scheme": "http",
        "network.protocol.version": "1.1",
        "http.route": "/items/<int:item_id>",
        "http.response.status_code": 200,
    }
    (unmatched,) = series_of(rows, **{"http.response.status_code": 404})
    assert "http.route" not in unmatched["attributes"] and unmatched["count"] == 2
    # Flask turns the exception into its 500 page: the status says it failed.
    (failed,) = series_of(rows, **{"http.route": "/fail"})
    assert failed["attributes"]["http.response.status_code"] == 500
    assert failed["attributes"]["error.type"] == "500"
    (unavailable,) = series_of(rows, **{"http.route": "/status/<int:code>"})
    assert unavailable["attributes"]["error.type"] == "503"
    assert series_of(rows, tenant="acme")[0]["count"] == 1


@pytest.fixture(scope="module")
def django_service():
    env = servers._environment(None, DJANGO_SETTINGS_MODULE="django_site.settings")
    with servers.gunicorn("django_site.wsgi:application", env=env) as running:
        yield running


def test_django_routes_are_the_resolved_patterns(django_service) -> None:
    port = django_service.port
    assert request(port, "/items/7") == (200, b"7")
    assert request(port, "/items/8") == (200, b"8")
    assert request(port, "/articles/2026/hello/") == (200, b"2026/hello")
    assert request(port, "/articles/2025/other/") == (200, b"2025/other")
    assert request(port, "/missing/1")[0] == 404
    assert request(port, "/fail")[0] == 500
    servers.wait_for(
        lambda: any(
            row["attributes"].get("http.route") == "/fail"
            for row in json.loads(request(port, "/charged")[1])
        ),
        what="the last request to end",
    )
    status, body = request(port, "/charged")
    assert status == 200
    rows = json.loads(body)
    assert series_of(rows, **{"http.route": "/items/<int:item_id>"})[0]["count"] == 2
    (articles,) = series_of(rows, **{"http.route": "/articles/<int:year>/<slug:slug>/"})
    assert articles["count"] == 2
    (missing,) = series_of(rows, **{"http.response.status_code": 404})
    assert "http.route" not in missing["attributes"]
    (failed,) = series_of(rows, **{"http.route": "/fail"})
    assert failed["attributes"]["http.response.status_code"] == 500
