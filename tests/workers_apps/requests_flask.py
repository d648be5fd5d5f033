"""A Flask application metered by meterage's WSGI middleware, for gunicorn: routes whose
true cost is known (``/burn`` spends ``BURN_NS`` of thread CPU; ``/burn/pool`` spends it in a
ThreadPoolExecutor the view submits to; ``/burn/stream`` in the chunks of a streamed body;
``/idle...`` the same spending nothing; ``/write`` writes 64 KiB), routes with parameters,
a failing route; ``/charged`` answers what meterage recorded."""

from __future__ import annotations

import concurrent.futures
import json
import os
import tempfile
import time
from typing import Any

from flask import Flask, Response, abort

import meterage
from meterage.wsgi import MeterageMiddleware

BURN_NS = int(os.environ.get("REQUESTS_APP_BURN_NS", "20000000"))
POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2)

app = Flask(__name__)


def burn(ns: int = BURN_NS) -> None:
    began = time.thread_time_ns()
    while time.thread_time_ns() - began < ns:
        pass


@app.get("/")
def root() -> str:
    return str(os.getpid())


def add_burn_routes(prefix: str, ns: int) -> None:
    """``prefix`` spends ``ns`` in the view, ``prefix/pool`` in the pool, ``prefix/stream``
    in the chunks of its body: ``/burn`` spends ``BURN_NS``, ``/idle`` nothing, so that a
    test can tell the burn from the rest of a request's own work."""

    def here() -> str:
        burn(ns)
        return "ok"

    def in_pool() -> str:
        POOL.submit(burn, ns).result()
        return "ok"

    def stream() -> Response:
        def chunks() -> Any:
            for _ in range(4):
                burn(ns // 4)  # each chunk's work is a step of the request
                yield b"x" * 1000

        return Response(chunks(), mimetype="text/plain")

    name = prefix.strip("/")
    app.add_url_rule(prefix, f"{name}_here", here)
    app.add_url_rule(f"{prefix}/pool", f"{name}_in_pool", in_pool)
    app.add_url_rule(f"{prefix}/stream", f"{name}_stream", stream)


add_burn_routes("/burn", BURN_NS)
add_burn_routes("/idle", 0)


@app.get("/write")
def write() -> str:
    with tempfile.TemporaryFile() as file:
        os.write(file.fileno(), b"x" * 65536)
    return "ok"


@app.get("/items/<int:item_id>")
def item(item_id: int) -> str:
    return str(item_id)


@app.get("/tenant/<name>")
def tenant(name: str) -> str:
    call = meterage.current_call()
    assert call is not None
    call.set_attribute("tenant", name)
    return name


@app.get("/fail")
def fail() -> str:
    raise RuntimeError("the view failed")


@app.get("/status/<int:code>")
def status(code: int) -> Any:
    abort(code)


@app.get("/charged")
def charged() -> Response:
    rows = []
    for series in meterage.snapshot():
        if series.operation != "http.server.request":
            continue
        histograms = series.histograms
        cpu = histograms.get("cpu.time")
        rows.append(
            {
                "attributes": series.attributes,
                "count": series.count,
                "sampled": series.sampled,
                "cpu_ns": cpu.sum * 1e9 if cpu else None,
                "cpu_median_ns": cpu.quantile(0.5) * 1e9 if cpu else None,
                "io_write": histograms["io.write"].sum if "io.write" in histograms else None,
            }
        )
    sizes = meterage.histogram("http.server.response.body.size")
    body = {
        "rows": rows,
        "stream_bytes": sizes.snapshot(
            {
                "http.request.method": "GET",
                "url.scheme": "http",
                "network.protocol.version": "1.1",
                "http.route": "/idle/stream",
                "http.response.status_code": 200,
            }
        ).sum,
    }
    return Response(json.dumps(body), mimetype="application/json")


app.wsgi_app = MeterageMiddleware(app.wsgi_app, sample=1.0)  # type: ignore[method-assign]
