"""An adversarial Starlette/FastAPI application metered by meterage's ASGI middleware, for
uvicorn (asyncio or uvloop) and hypercorn (asyncio or trio).

In-flight counting is on (``meterage.otel.attach`` on an SDK MeterProvider). Every request
is probed (``sample=1.0``); the cardinality limit is ``ADV_CARDINALITY`` (default 50) so
that a flood of tenants overflows quickly. Routes:

* ``/items/{item_id}``; ``/tenants/{tenant}/users/{user}`` (a Starlette mount with a
  parameter); one FastAPI sub-application mounted twice, at ``/v1`` and ``/v2``
  (``/things/{thing}``); anything else is a 404;
* ``/boom`` raises; ``/stream`` streams three chunks; ``/cancel-me`` sleeps (a client
  that goes away cancels it);
* ``/burn/task`` burns ``BURN_NS`` of CPU in a task it creates; ``/factory`` sets a task
  factory of the application's own on the running loop (after meterage's); ``/loop``
  tells the running loop's class and task factory;
* ``/charged`` answers what meterage recorded for requests, with the calls in flight.

The tenant of each request is its ``x-tenant`` header (``attributes=``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import sniffio
from fastapi import FastAPI
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import meterage
import meterage.otel
from meterage.asgi import MeterageMiddleware

BURN_NS = int(os.environ.get("ADV_BURN_NS", "20000000"))
meterage.configure(cardinality_limit=int(os.environ.get("ADV_CARDINALITY", "50")))
_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
meterage.otel.attach(_provider, process=False, spans=False, host=False)


def burn(ns: int = BURN_NS) -> None:
    began = time.thread_time_ns()
    while time.thread_time_ns() - began < ns:
        pass


async def users(request: Request) -> Response:
    return PlainTextResponse(f"{request.path_params['tenant']}/{request.path_params['user']}")


tenants = Starlette(routes=[Route("/users/{user}", users)])

things = FastAPI()


@things.get("/things/{thing}")
async def thing(thing: int) -> dict[str, int]:
    return {"thing": thing}


app = FastAPI()


@app.get("/")
async def root() -> str:
    return "ok"


@app.api_route("/items/{item_id}", methods=["GET", "HEAD"])
async def item(item_id: int) -> dict[str, int]:
    return {"item": item_id}


@app.get("/boom")
async def boom() -> None:
    raise LookupError("boom")


@app.get("/stream")
async def stream() -> StreamingResponse:
    async def chunks() -> Any:
        for index in range(3):
            await asyncio.sleep(0)
            yield f"chunk{index}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


@app.get("/cancel-me")
async def cancel_me() -> StreamingResponse:
    """Streams nothing for 30 s: Starlette cancels it once the client has gone."""

    async def chunks() -> Any:
        await asyncio.sleep(30)
        yield b"late"

    return StreamingResponse(chunks(), media_type="text/plain")


@app.get("/burn/task")
async def burn_task() -> str:
    async def work() -> None:
        burn()

    await asyncio.create_task(work())
    return "burnt"


def _own_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
    return asyncio.Task(coro, loop=loop, **kwargs)


@app.get("/factory")
async def factory() -> str:
    asyncio.get_running_loop().set_task_factory(_own_factory)
    return "set"


@app.get("/loop")
async def loop_info() -> dict[str, str]:
    loop = asyncio.get_running_loop()
    return {"loop": type(loop).__module__, "factory": repr(loop.get_task_factory())}


@app.get("/charged")
async def charged() -> Response:
    rows = []
    for series in meterage.snapshot():
        if series.operation != "http.server.request":
            continue
        histograms = series.histograms
        rows.append(
            {
                "attributes": series.attributes,
                "count": series.count,
                "active": series.active,
                "cpu_ns": histograms["cpu.time"].sum * 1e9 if "cpu.time" in histograms else None,
            }
        )
    return Response(json.dumps({"rows": rows}), media_type="application/json")


app.mount("/tenants/{tenant}", tenants)
app.mount("/v1", things)
app.mount("/v2", things)


def tenant_of(scope: Any) -> dict[str, str]:
    headers = dict(scope.get("headers") or [])
    tenant = headers.get(b"x-tenant")
    return {} if tenant is None else {"tenant": tenant.decode("ascii", "replace")}


app.add_middleware(MeterageMiddleware, attributes=tenant_of, sample=1.0)


# A plain ASGI application (no framework, no asyncio of its own) for any event loop, trio
# included: ``/`` answers, ``/charged`` answers what meterage recorded.
async def _plain(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/charged":
        rows = [
            {"attributes": s.attributes, "count": s.count, "active": s.active}
            for s in meterage.snapshot()
            if s.operation == "http.server.request"
        ]
        body = json.dumps({"rows": rows, "library": sniffio.current_async_library()}).encode()
    else:
        body = b"plain"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


_probed = MeterageMiddleware(_plain, sample=1.0)
_timer = MeterageMiddleware(_plain, probes=())


# Entry points that every server sees as ASGI 3 coroutine functions (hypercorn asks
# inspect.iscoroutinefunction, which the middleware answers only on Python >= 3.12).
async def plain(scope: Any, receive: Any, send: Any) -> None:
    await _probed(scope, receive, send)


async def plain_timer(scope: Any, receive: Any, send: Any) -> None:
    await _timer(scope, receive, send)


#: The middleware itself as the application (``app = MeterageMiddleware(app)``).
plain_middleware = _timer


class ClassApp:
    """An ASGI 3 application that is a class: each request is an instance, awaited. It
    keeps the server's callables as attributes, as such applications do (``self.send``)."""

    def __init__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send

    def __await__(self) -> Any:
        return self.handle().__await__()

    async def handle(self) -> None:
        if self.scope["type"] != "http":
            return
        await self.send({"type": "http.response.start", "status": 200, "headers": []})
        await self.send({"type": "http.response.body", "body": b"class"})


class_app = MeterageMiddleware(ClassApp)
