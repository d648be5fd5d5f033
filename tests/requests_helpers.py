"""What the request middleware tests share: one HTTP request on a fresh connection, the
series of a test app's ``/charged`` answer, and waiting for a request's call to end (it
ends just after its response is sent, so a client can ask before)."""

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
