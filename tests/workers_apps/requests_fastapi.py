"""A FastAPI application metered by meterage's ASGI middleware, for uvicorn: routes whose
true cost is known, so that the test can compare what each request was charged with it.

Every request is probed (``sample=1.0``). ``/burn/*`` routes spend ``BURN_NS`` of thread
CPU time (read from the thread's own clock) in different places: the request's coroutine,
a created task, ``asyncio.to_thread``, a sync route (anyio's thread pool), a
``gather`` of two tasks, a TaskGroup, ``run_in_executor``, a background task, a streamed
body's chunks; ``/idle/*`` are the same routes spending nothing; ``/sleep`` waits without CPU;
``/write`` writes ``WRITE_BYTES`` to a file through ``to_thread``. ``/charged`` answers
what meterage recorded, by route, as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from typing import Any

from fastapi import APIRouter, BackgroundTasks, FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import meterage
import meterage.otel
from meterage.asgi import MeterageMiddleware

BURN_NS = int(os.environ.get("REQUESTS_APP_BURN_NS", "20000000"))
WRITE_BYTES = 64 * 1024


def burn(ns: int = BURN_NS) -> int:
    """Spends ``ns`` of this thread's CPU time; returns what it spent."""
    began = time.thread_time_ns()
    while time.thread_time_ns() - began < ns:
        pass
    return time.thread_time_ns() - began


async def burn_in_steps(ns: int = BURN_NS, steps: int = 4) -> None:
    """Burns ``ns`` in ``steps`` pieces, yielding to the loop in between (other requests'
    steps run on the same thread meanwhile)."""
    for _ in range(steps):
        burn(ns // steps)
        await asyncio.sleep(0)


def write_file(size: int = WRITE_BYTES) -> None:
    with tempfile.TemporaryFile() as file:
        os.write(file.fileno(), b"x" * size)


app = FastAPI()
router = APIRouter(prefix="/api")
items = FastAPI()


@app.get("/")
async def root() -> PlainTextResponse:
    return PlainTextResponse(str(os.getpid()))


def add_burn_routes(prefix: str, ns: int) -> None:
    """The routes that spend ``ns`` in each place, under ``prefix``: ``/burn`` spends
    ``BURN_NS``, ``/idle`` nothing, so that a test can tell the burn from the rest of a
    request's own work (the framework's and the server's: hundreds of µs on a busy VM)."""

    @app.get(f"{prefix}/direct")
    async def direct() -> PlainTextResponse:
        await burn_in_steps(ns)
        return PlainTextResponse("ok")

    @app.get(f"{prefix}/task")
    async def task() -> PlainTextResponse:
        await asyncio.create_task(burn_in_steps(ns))
        return PlainTextResponse("ok")

    @app.get(f"{prefix}/gather")
    async def gather() -> PlainTextResponse:
        await asyncio.gather(burn_in_steps(ns // 2), burn_in_steps(ns // 2))
        return PlainTextResponse("ok")

    @app.get(f"{prefix}/taskgroup")
    async def taskgroup() -> PlainTextResponse:
        if sys.version_info >= (3, 11):
            async with asyncio.TaskGroup() as group:
                group.create_task(burn_in_steps(ns // 2))
                group.create_task(burn_in_steps(ns // 2))
        else:  # no TaskGroup before 3.11: the same through create_task
            await asyncio.wait([asyncio.create_task(burn_in_steps(ns // 2)) for _ in range(2)])
        return PlainTextResponse("ok")

    @app.get(f"{prefix}/to_thread")
    async def to_thread() -> PlainTextResponse:
        await asyncio.to_thread(burn, ns)
        return PlainTextResponse("ok")

    @app.get(f"{prefix}/executor")
    async def executor() -> PlainTextResponse:
        await asyncio.get_running_loop().run_in_executor(None, burn, ns)
        return PlainTextResponse("ok")

    @app.get(f"{prefix}/sync")
    def sync() -> PlainTextResponse:  # FastAPI runs it in anyio's thread pool
        burn(ns)
        return PlainTextResponse("ok")

    @app.get(f"{prefix}/background")
    async def background(tasks: BackgroundTasks) -> PlainTextResponse:
        tasks.add_task(burn, ns)  # a sync background task: anyio's pool, after the response
        return PlainTextResponse("ok")

    @app.get(f"{prefix}/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> Any:
            for _ in range(4):
                burn(ns // 4)  # each chunk's work is the request's
                yield b"y" * 1000
                await asyncio.sleep(0)

        return StreamingResponse(chunks(), media_type="text/plain")


add_burn_routes("/burn", BURN_NS)
add_burn_routes("/idle", 0)


@app.get("/sleep")
async def sleep() -> PlainTextResponse:
    await asyncio.sleep(0.02)
    return PlainTextResponse("ok")


@app.get("/write")
async def write() -> PlainTextResponse:
    await asyncio.to_thread(write_file)
    return PlainTextResponse("ok")


@app.get("/tenant/{name}")
async def tenant(name: str) -> PlainTextResponse:
    call = meterage.current_call()
    assert call is not None
    call.set_attribute("tenant", name)
    return PlainTextResponse(name)


@app.post("/upload")
async def upload(request: Request) -> PlainTextResponse:
    body = await request.body()
    return PlainTextResponse(str(len(body)))


@app.get("/timeout")
async def timeout() -> PlainTextResponse:
    await asyncio.wait_for(asyncio.sleep(10), timeout=0.01)  # raises TimeoutError
    return PlainTextResponse("never")


@app.get("/slow")
async def slow() -> PlainTextResponse:
    await asyncio.sleep(0.3)
    return PlainTextResponse("late")


@app.websocket("/ws/{room}")
async def echo(websocket: WebSocket, room: str) -> None:
    """Echoes each text message back twice until the client closes."""
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(text)
            await websocket.send_text(text)
    except Exception:  # the client went away (WebSocketDisconnect)
        return


@router.get("/items/{item_id}")
async def item(item_id: int) -> PlainTextResponse:
    return PlainTextResponse(str(item_id))


@router.get("/fail")
async def fail() -> PlainTextResponse:
    raise RuntimeError("the route failed")


@router.get("/status/{code}")
async def status(code: int) -> Response:
    if code >= 400:
        raise HTTPException(status_code=code)
    return Response(status_code=code)


@items.get("/things/{thing_id}")
async def thing(thing_id: str) -> PlainTextResponse:
    return PlainTextResponse(thing_id)


app.include_router(router)
app.mount("/sub", items)


@app.get("/charged")
async def charged() -> Response:
    """What meterage recorded for requests, by route (the JSON of each series)."""
    rows: list[dict[str, Any]] = []
    for series in meterage.snapshot():
        if series.operation != "http.server.request":
            continue
        histograms = series.histograms
        rows.append(
            {
                "attributes": series.attributes,
                "count": series.count,
                "sampled": series.sampled,
                "cpu_ns": histograms["cpu.time"].sum * 1e9 if "cpu.time" in histograms else None,
                "cpu_median_ns": histograms["cpu.time"].quantile(0.5) * 1e9
                if "cpu.time" in histograms
                else None,
                "io_write": histograms["io.write"].sum if "io.write" in histograms else None,
                "active": series.active,
            }
        )
    sessions = [
        {"attributes": s.attributes, "count": s.count}
        for s in meterage.snapshot()
        if s.operation == "websocket.server.session"
    ]
    messages = [
        {"attributes": s.attributes, "value": s.value}
        for s in meterage.snapshot()
        if s.name == "websocket.server.messages"
    ]
    sizes = {
        name: [
            {"attributes": s.attributes, "count": s.count, "sum": s.histograms[name].sum}
            for s in meterage.snapshot()
            if s.name == name
        ]
        for name in ("http.server.request.body.size", "http.server.response.body.size")
    }
    body = {"rows": rows, "sizes": sizes, "sessions": sessions, "messages": messages}
    return Response(json.dumps(body), media_type="application/json")


app.add_middleware(MeterageMiddleware, sample=1.0)
# Attached as a service would be: calls in flight are counted (Series.active).
READER = InMemoryMetricReader()
meterage.otel.attach(MeterProvider(metric_readers=[READER]))
