"""What the request middleware tests share: one HTTP request on a fresh connection, the
series of a test app's ``/charged`` answer, waiting for a request's call to end (it ends
just after its response is sent, so a client can ask before), and the check that a route
burning a known CPU time was charged it."""

from __future__ import annotations

import http.client
from collections.abc import Callable
from typing import Any

import servers

Rows = list[dict[str, Any]]


def request(
    port: int, path: str, method: str = "GET", body: bytes | None = None
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers={"Connection": "close"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def series_of(rows: Rows, **attributes: Any) -> Rows:
    """The rows whose series has all of ``attributes``."""
    return [
        row
        for row in rows
        if all(row["attributes"].get(key) == value for key, value in attributes.items())
    ]


def settled(rows_of: Callable[[], Rows], count: int, **attributes: Any) -> dict[str, Any]:
    """The one series with ``attributes`` once it has ``count`` calls."""
    rows = servers.wait_for(
        lambda: [row for row in series_of(rows_of(), **attributes) if row["count"] >= count],
        what=f"{count} requests with {attributes}",
        timeout=20,
    )
    (row,) = rows
    return row  # type: ignore[no-any-return]


def assert_charged(row: dict[str, Any], burn_ns: int, *, beside: dict[str, Any], what: str) -> None:
    """Each request of ``row``'s series spent ``burn_ns`` of its own besides what one of
    ``beside`` spent (the same route spending nothing, its requests interleaved with
    ``row``'s: the framework's, the server's and the meter's work under the same load,
    0.3-0.9 ms per request on the development VM, more on a busy host). Other requests ran
    on the same threads meanwhile, and none of theirs may be charged to it: within 10%."""
    mean, idle_mean = row["cpu_ns"] / row["count"], beside["cpu_ns"] / beside["count"]
    assert burn_ns <= mean <= 1.1 * burn_ns + idle_mean, (
        f"{what}: {mean / 1e6:.2f} ms per request, {idle_mean / 1e6:.2f} ms idle"
    )
    # The median request too (a garbage collection that ran in one request's thread is
    # that thread's work, and may make one request dearer than the rest); 3% below for
    # the histogram's resolution.
    median, idle_median = row["cpu_median_ns"], beside["cpu_median_ns"]
    assert 0.97 * burn_ns <= median <= 1.1 * burn_ns + idle_median, (
        f"{what}: median {median / 1e6:.2f} ms, {idle_median / 1e6:.2f} ms idle"
    )
