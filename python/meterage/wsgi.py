"""Meters every request of a WSGI application.

```python
from flask import Flask

from meterage.wsgi import MeterageMiddleware

app = Flask(__name__)
app.wsgi_app = MeterageMiddleware(app.wsgi_app)  # Flask: the route is its URL rule
```

Each request is a call of operation ``http.server.request`` with OpenTelemetry's HTTP
attributes, from the application's call to the end of its response body (each chunk's
production is a step of the call), charged for the work the request hands to thread pools
as well. Wrapping a Flask application's ``wsgi_app`` names each request's route from its
URL rule; Django names it with ``meterage.integrations.django.RouteMiddleware``; any
application can set ``http.route`` on ``meterage.current_call()`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from meterage import _http, _native

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

__all__ = ["MeterageMiddleware"]


def _content_length(environ: dict[str, Any]) -> int:
    try:
        return max(int(environ.get("CONTENT_LENGTH") or 0), 0)
    except ValueError:
        return 0


class _Response:
    """The application's response body, each chunk made as a step of the request's call;
    closing it (or its end) ends the call."""

    __slots__ = ("_body", "_call", "_iterator", "_meters", "_request_bytes", "_sent", "_state")

    def __init__(
        self,
        body: Iterable[bytes],
        call: _native.OpenCall,
        meters: _http.RequestMeters,
        state: list[Any],
        request_bytes: int,
    ) -> None:
        self._body = body
        self._iterator: Iterator[bytes] | None = None
        self._call = call
        self._meters = meters
        self._state = state
        self._request_bytes = request_bytes
        self._sent = 0

    def __iter__(self) -> _Response:
        return self

    def __next__(self) -> bytes:
        call = self._call
        try:
            if self._iterator is None:
                self._iterator = call.run(iter, self._body)
            chunk: bytes = call.run(next, self._iterator)
        except StopIteration:
            self._end(None)
            raise
        except BaseException as error:
            self._end(error)
            raise
        self._sent += len(chunk)
        return chunk

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        try:
            if close is not None:
                self._call.run(close)
        except BaseException as error:
            self._end(error)
            raise
        self._end(None)

    def _end(self, error: BaseException | None) -> None:
        if self._call.ended:
            return
        self._meters.finish(self._call, self._state[0], error, self._request_bytes, self._sent)


class MeterageMiddleware(_http.Middleware):
    """WSGI middleware metering each request of ``app`` (``attributes``, ``probes``,
    ``sample``, ``budget``: as for ``meterage.asgi.MeterageMiddleware``).

    ```python
    import meterage
    from meterage.wsgi import MeterageMiddleware


    def app(environ, start_response):
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"made"]


    metered = MeterageMiddleware(app)
    statuses = []
    environ = {"REQUEST_METHOD": "POST", "wsgi.url_scheme": "http",
               "SERVER_PROTOCOL": "HTTP/1.1", "PATH_INFO": "/things"}
    body = metered(environ, lambda status, headers, exc_info=None: statuses.append(status))
    assert b"".join(body) == b"made" and statuses == ["201 Created"]
    body.close()
    (series,) = [s for s in meterage.snapshot() if s.operation == "http.server.request"
                 and s.attributes.get("http.request.method") == "POST"]
    assert series.attributes["http.response.status_code"] == 201
    ```
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        attributes: _http.AttributesOf | None = None,
        probes: tuple[str, ...] | None = None,
        sample: float | None = None,
        budget: float | None = None,
    ) -> None:
        super().__init__(app, "WSGI", attributes, probes, sample, budget)
        from meterage.integrations import flask as _flask

        _flask.name_routes_of(app)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        protocol = environ.get("SERVER_PROTOCOL")
        call = self._meters.open(
            _http.method_of(environ.get("REQUEST_METHOD")),
            environ.get("wsgi.url_scheme") or "http",
            protocol[5:] if isinstance(protocol, str) and protocol.startswith("HTTP/") else None,
        )
        state: list[Any] = [None]

        def watching_start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            try:
                state[0] = int(status[:3])
            except (TypeError, ValueError):
                state[0] = None
            return start_response(status, headers, exc_info)

        request_bytes = _content_length(environ)
        try:
            if self._attributes_of is not None:
                self._extra_attributes(call, environ)
            body = call.run(self.app, environ, watching_start_response)
        except BaseException as error:
            self._meters.finish(
                call, state[0] if state[0] is not None else 500, error, request_bytes, 0
            )
            raise
        return _Response(body, call, self._meters, state, request_bytes)
