"""What the ASGI and WSGI middlewares share: the request's meter, its attributes under
OpenTelemetry's HTTP semantic conventions, and its body-size histograms.

A request is a call of operation ``http.server.request`` (an ``OpenCall``) whose series
carries ``http.request.method``, ``url.scheme``, ``network.protocol.version``,
``http.route``, ``http.response.status_code`` and, for failures, ``error.type``. Its meter
is one per method, scheme and protocol version (its static attributes), so the in-flight
count is per method and scheme as ``http.server.active_requests`` wants it; the rest are
set on the call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import meterage
from meterage import _native

OPERATION = "http.server.request"
#: A websocket session's operation: its duration is the session's, not a request's.
WEBSOCKET_OPERATION = "websocket.server.session"
#: A function of the request (an ASGI scope, a WSGI environ) giving attributes of its own
#: (a tenant, a plan), or None.
AttributesOf = Callable[[Any], "Mapping[str, Any] | None"]
#: ``network.protocol.version`` of the versions a server may name ("HTTP/2.0" is "2"); any
#: other leaves the attribute out, so a client's made-up version makes no meter of its own.
PROTOCOL_VERSIONS = {
    "0.9": "0.9",
    "1": "1.0",  # granian's HTTP/1.0
    "1.0": "1.0",
    "1.1": "1.1",
    "2": "2",
    "2.0": "2",
    "3": "3",
    "3.0": "3",
}
#: ``url.scheme`` of the schemes HTTP servers serve; any other is ``_OTHER``, as unknown
#: methods are (a proxy's forwarded scheme can be anything a client sends).
SCHEMES = frozenset(("http", "https", "ws", "wss"))
OTHER = "_OTHER"


class Middleware:
    """What both middlewares hold: the application, the user's attribute function and
    the request meters. Checks its arguments, each named in its error."""

    def __init__(
        self,
        app: Any,
        kind: str,
        attributes: AttributesOf | None,
        probes: tuple[str, ...] | None,
        sample: float | None,
        budget: float | None,
    ) -> None:
        if not callable(app):
            raise TypeError(
                f"app must be a {kind} application (a callable), not {type(app).__name__}"
            )
        if attributes is not None and not callable(attributes):
            raise TypeError(
                "attributes must be a function of the request returning a mapping of "
                f"attributes (or None), not {type(attributes).__name__}"
            )
        self.app = app
        self._attributes_of = attributes
        self._meters = RequestMeters(probes=probes, sample=sample, budget=budget)
        from meterage import _handoff

        _handoff.install()

    def _extra_attributes(self, call: _native.OpenCall, request: Any) -> None:
        """Sets what the user's function gives for this request; its errors propagate (it
        is application code, and must not fail silently)."""
        if self._attributes_of is not None:
            extra = self._attributes_of(request)
            if extra:
                call.set_attributes(extra)


class RequestMeters:
    """The meters of one middleware, by (method, scheme), and its body-size histograms."""

    def __init__(
        self,
        *,
        probes: tuple[str, ...] | None,
        sample: float | None,
        budget: float | None,
        operation: str = OPERATION,
    ) -> None:
        # Checked now (a bad value raises at the middleware's construction, naming it).
        meterage.meter(operation, probes=probes, sample=sample, budget=budget)
        self.operation = operation
        self._settings: dict[str, Any] = {"probes": probes, "sample": sample, "budget": budget}
        self._cores: dict[tuple[str, str, str | None], _native.MeterCore] = {}
        self.request_size = meterage.histogram(
            "http.server.request.body.size",
            unit="By",
            description="Size of HTTP request bodies.",
            boundaries=meterage.BOUNDARIES["bytes"],
        )
        self.response_size = meterage.histogram(
            "http.server.response.body.size",
            unit="By",
            description="Size of HTTP response bodies.",
            boundaries=meterage.BOUNDARIES["bytes"],
        )
        self.websocket_messages = meterage.counter(
            "websocket.server.messages",
            unit="{message}",
            description="Websocket messages received and sent, by direction.",
        )

    def meter_for(self, method: str, scheme: str, version: str | None) -> _native.MeterCore:
        """The meter of requests with this (already normalized) method, and this scheme and
        protocol version as the server gave them: a bounded set of meters, whatever
        clients send (``SCHEMES``, ``PROTOCOL_VERSIONS``)."""
        scheme = scheme.lower()  # a forwarded scheme may come as a client wrote it
        scheme = scheme if scheme in SCHEMES else OTHER
        version = None if version is None else PROTOCOL_VERSIONS.get(version)
        key = (method, scheme, version)
        core = self._cores.get(key)
        if core is None:
            static: dict[str, str] = {"http.request.method": method, "url.scheme": scheme}
            if version is not None:
                static["network.protocol.version"] = version
            core = self._cores[key] = meterage.meter(
                self.operation, attributes=static, **self._settings
            )
        return core

    def open(self, method: str, scheme: str, version: str | None) -> _native.OpenCall:
        """A new call of a request with this (already normalized) method, scheme and
        protocol version, started now; a traced request runs its probes in full."""
        call = self.meter_for(method, scheme, version).call()
        call.start(probe=_native.traced_now())
        return call


def error_type(error: BaseException) -> str:
    """The ``error.type`` of an exception, as meterage records it for calls."""
    return type(error).__qualname__
