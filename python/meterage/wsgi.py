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

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from meterage import _http, _native

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

__all__ = ["MeterageMiddleware"]


class MeterageMiddleware(_http.Middleware, _native.WsgiMiddlewareBase):
    """WSGI middleware metering each request of ``app`` (``attributes``, ``probes``,
    ``sample``, ``budget``: as for ``meterage.asgi.MeterageMiddleware``).

    >>> import meterage
    >>> def app(environ, start_response):
    ...     start_response("201 Created", [("Content-Type", "text/plain")])
    ...     return [b"made"]
    >>> environ = {"REQUEST_METHOD": "POST", "wsgi.url_scheme": "http",
    ...            "SERVER_PROTOCOL": "HTTP/1.1", "PATH_INFO": "/things"}
    >>> body = MeterageMiddleware(app)(environ, lambda status, headers, exc_info=None: None)
    >>> b"".join(body)
    b'made'
    >>> body.close()  # the server closes the body: the request's call ends
    >>> [(s.count, s.attributes["http.response.status_code"]) for s in meterage.snapshot()
    ...  if s.operation == "http.server.request" and s.attributes["http.request.method"] == "POST"]
    [(1, 201)]
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
        # Each request is handled natively: the application, each chunk of its body and
        # the body's close() run as steps of the request's call; at its end the route is
        # read from werkzeug's request (Flask's URL rule) when there is one.
        self._requests = _native.WsgiMeter(
            app,
            meter_for=self._meters.meter_for,
            request_size=self._meters.request_size,
            response_size=self._meters.response_size,
            attributes_of=self._attributes_of,
            werkzeug_routes=True,
        )
        # Calling the middleware is the native base's call of this meter (no Python frame).
        self._set_requests(self._requests)

    if TYPE_CHECKING:

        def __call__(
            self, environ: dict[str, Any], start_response: StartResponse
        ) -> Iterable[bytes]: ...
