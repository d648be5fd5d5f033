"""Meters every HTTP request and websocket session of an ASGI application.

```python
from starlette.applications import Starlette

from meterage.asgi import MeterageMiddleware

app = Starlette()
app.add_middleware(MeterageMiddleware)  # or: app = MeterageMiddleware(app)
```

Each request is a call of operation ``http.server.request`` with OpenTelemetry's HTTP
attributes (``http.request.method``, ``http.route``, ``http.response.status_code``,
``url.scheme``, ``network.protocol.version``, ``error.type``), charged only for its own
work: its coroutine's steps, the tasks it creates and what it runs in thread pools. The
request's call is ``meterage.current_call()`` in its handlers. Works for any ASGI
application (Starlette, FastAPI, Litestar, Quart, Django); the route template is found for
Starlette and FastAPI (mounts and routers included) and for Django with
``meterage.integrations.django.RouteMiddleware``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from meterage import _handoff, _http, _routes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["MeterageMiddleware"]

_CURRENT = _handoff._CURRENT


class MeterageMiddleware(_http.Middleware):
    """ASGI middleware metering each request of ``app``.

    * ``attributes`` — a function of the ASGI scope returning more attributes for the
      request's series (a tenant, a plan), or None; capped like every attribute by the
      cardinality limit (see docs/integrations.md).
    * ``probes``, ``sample``, ``budget`` — as for ``meterage.meter``.

    ```python
    import asyncio

    import meterage
    from meterage.asgi import MeterageMiddleware


    async def app(scope, receive, send):
        meterage.current_call().set_attribute("tenant", "acme")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hello"})


    metered = MeterageMiddleware(app)


    async def one_request():
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "scheme": "http", "http_version": "1.1",
                 "path": "/", "headers": []}
        await metered(scope, receive, send)
        return sent


    assert asyncio.run(one_request())[1]["body"] == b"hello"
    (series,) = [s for s in meterage.snapshot()
                 if s.operation == "http.server.request" and s.attributes.get("tenant") == "acme"]
    assert series.attributes["http.response.status_code"] == 200
    ```
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        attributes: _http.AttributesOf | None = None,
        probes: tuple[str, ...] | None = None,
        sample: float | None = None,
        budget: float | None = None,
    ) -> None:
        super().__init__(app, "ASGI", attributes, probes, sample, budget)
        self._sessions = _http.RequestMeters(
            probes=probes, sample=sample, budget=budget, operation=_http.WEBSOCKET_OPERATION
        )
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            if scope.get("type") == "websocket":
                await self._websocket(scope, receive, send)
            else:  # lifespan, and anything a server may add: not requests
                await self.app(scope, receive, send)
            return
        # One request: kept in this one frame, since every call and closure here is paid
        # by every request.
        application = scope.get("app", self.app)
        call = self._open(scope, _http.method_of(scope.get("method")), self._meters)
        status: int | None = None
        received = 0
        sent = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            body = message.get("body")
            if body:
                received += len(body)
            return message

        def watching_send(message: Message) -> Awaitable[None]:
            # A plain function handing back the server's awaitable: no frame of its own.
            nonlocal status, sent
            kind = message.get("type")
            if kind == "http.response.body":
                body = message.get("body")
                if body:
                    sent += len(body)
            elif kind == "http.response.start":
                status = message.get("status")
            return send(message)

        error: BaseException | None = None
        token = _CURRENT.set(call)
        try:
            await call.steps(self.app(scope, counting_receive, watching_send))
        except BaseException as raised:
            error = raised
            if status is None and not isinstance(raised, asyncio.CancelledError):
                status = 500  # the server answers 500 to an application that raised
            raise
        finally:
            _CURRENT.reset(token)
            self._name_route(call, scope, application)
            self._meters.finish(
                call, status if isinstance(status, int) else None, error, received, sent
            )

    def _open(self, scope: Scope, method: str, meters: _http.RequestMeters) -> Any:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            _handoff.watch_loop(loop)
            self._loop = loop
        version = scope.get("http_version")
        call = meters.open(
            method, scope.get("scheme") or "http", None if version is None else str(version)
        )
        if self._attributes_of is not None:
            self._extra_attributes(call, scope)
        return call

    @staticmethod
    def _name_route(call: Any, scope: Scope, application: Any) -> None:
        if "route" not in scope:
            return
        try:
            route = _routes.template(scope, application)
            if route is not None and not call.has_attribute("http.route"):
                call.set_attribute("http.route", route)
        except Exception:  # a framework's routes we cannot read: the request still counts
            pass

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        application = scope.get("app", self.app)
        call = self._open(scope, "GET", self._sessions)
        received = 0
        sent = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message.get("type") == "websocket.receive":
                received += 1
            return message

        def counting_send(message: Message) -> Awaitable[None]:
            nonlocal sent
            if message.get("type") == "websocket.send":
                sent += 1
            return send(message)

        error: BaseException | None = None
        token = _CURRENT.set(call)
        try:
            await call.steps(self.app(scope, counting_receive, counting_send))
        except BaseException as raised:
            error = raised
            raise
        finally:
            _CURRENT.reset(token)
            self._end_session(call, scope, application, error, received, sent)

    def _end_session(
        self,
        call: Any,
        scope: Scope,
        application: Any,
        error: BaseException | None,
        received: int,
        sent: int,
    ) -> None:
        self._name_route(call, scope, application)
        call.finish(error)
        attributes = call.attributes
        if error is not None:
            attributes["error.type"] = _http.error_type(error)
        self._sessions.websocket_messages.add(received, {**attributes, "io.direction": "receive"})
        self._sessions.websocket_messages.add(sent, {**attributes, "io.direction": "send"})
