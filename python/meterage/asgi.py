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
import types
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from meterage import _handoff, _http, _native, _routes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["MeterageMiddleware"]

_CURRENT = _handoff._CURRENT


class MeterageMiddleware(_http.Middleware, _native.AsgiMiddlewareBase):
    """ASGI middleware metering each request of ``app``.

    * ``attributes`` — a function of the ASGI scope returning more attributes for the
      request's series (a tenant, a plan), or None; capped like every attribute by the
      cardinality limit (see docs/integrations.md).
    * ``probes``, ``sample``, ``budget`` — as for ``meterage.meter``.

    >>> import asyncio, meterage
    >>> async def app(scope, receive, send):
    ...     meterage.current_call().set_attribute("tenant", "acme")
    ...     await send({"type": "http.response.start", "status": 200, "headers": []})
    ...     await send({"type": "http.response.body", "body": b"hello"})
    >>> async def one_request(application):
    ...     sent = []
    ...     async def receive():
    ...         return {"type": "http.request", "body": b"", "more_body": False}
    ...     async def send(message):
    ...         sent.append(message)
    ...     scope = {"type": "http", "method": "GET", "scheme": "http", "http_version": "1.1",
    ...              "path": "/", "headers": []}
    ...     await application(scope, receive, send)
    ...     return sent
    >>> asyncio.run(one_request(MeterageMiddleware(app)))[1]["body"]
    b'hello'
    >>> [(s.count, s.attributes["http.response.status_code"]) for s in meterage.snapshot()
    ...  if s.operation == "http.server.request" and s.attributes.get("tenant") == "acme"]
    [(1, 200)]
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
        # Each HTTP request is handled natively (one awaitable, no Python frame of its
        # own); every other scope comes back to _other.
        self._requests = _native.HttpMeter(
            app,
            other=self._other,
            meter_for=self._meters.meter_for,
            request_size=self._meters.request_size,
            response_size=self._meters.response_size,
            attributes_of=self._attributes_of,
            route_of=_routes.template_and_whether_only,
            on_probed=self._watch_loop,
        )
        # Calling the middleware is the native base's call of this meter (no Python frame).
        self._set_requests(self._requests)
        # What servers inspect (uvicorn, hypercorn, asgiref ask whether ``app.__call__`` is
        # a coroutine function, and treat an application whose is not as ASGI 2 or WSGI).
        self.__dict__["__call__"] = types.MethodType(_call_as_coroutine, self)

    if TYPE_CHECKING:

        def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]: ...

    def _other(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope.get("type") == "websocket":
            return self._websocket(scope, receive, send)
        application: ASGIApp = self.app
        return application(scope, receive, send)  # lifespan, and anything else: not requests

    def _watch_loop(self) -> None:
        """Before a probed request's first step: the tasks it creates on this loop are
        charged to it (meterage's task factory, put back in front if the application set
        its own since). Nothing outside asyncio (trio): its tasks are not charged."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        _handoff.watch_loop(loop)

    def _open(self, scope: Scope, method: str, meters: _http.RequestMeters) -> Any:
        self._watch_loop()
        scheme, version = scope.get("scheme"), scope.get("http_version")
        call = meters.open(
            method,
            scheme if isinstance(scheme, str) and scheme else "ws",
            version if isinstance(version, str) else None,
        )
        if self._attributes_of is not None:
            try:
                self._extra_attributes(call, scope)
            except BaseException as error:
                # The session fails with the error of the user's function: its call ends
                # with it (it must not stay in flight).
                call.finish(error)
                raise
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
        outer = _CURRENT.get()
        if outer is not None and not outer.ended and outer.operation == _http.WEBSOCKET_OPERATION:
            await self.app(scope, receive, send)  # an outer meterage middleware meters it
            return
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


async def _call_as_coroutine(
    middleware: MeterageMiddleware, scope: Scope, receive: Receive, send: Send
) -> Any:
    """A middleware's ``__call__`` as servers see it: a coroutine function (calling the
    middleware itself runs no Python frame of its own)."""
    return await middleware(scope, receive, send)  # the application's own outcome
