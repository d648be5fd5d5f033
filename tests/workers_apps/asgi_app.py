"""A plain ASGI app (no framework) with one metered route, for uvicorn.

Routes as wsgi_app's: ``/`` (this process's PID), ``/work`` (one metered call, operation
``OPERATION``, answering the PID), ``/block`` (holds the worker, its event loop included,
outside any metered call) and ``/metrics`` (``WORKERS_APP_EXPORT=route``).
It speaks the lifespan protocol. The export is set up when the module is imported: in each
worker (``uvicorn --workers N`` spawns them: each imports the app afresh).
"""

from __future__ import annotations

import os
import time
from typing import Any

import workers_export

import meterage

OPERATION = "workers.asgi.work"

workers_export.setup()


@meterage.meter(OPERATION, probes=("cpu",), sample=1.0)
async def work() -> bytes:
    # Blocks this worker's event loop a moment (no await), so that concurrent requests
    # spread over the workers instead of all landing on the first to accept.
    time.sleep(0.005)
    return str(os.getpid()).encode()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
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
    path = scope["path"]
    content_type = b"text/plain; charset=utf-8"
    status = 200
    if path == "/work":
        body = await work()
    elif path == "/":
        body = str(os.getpid()).encode()
    elif path == "/block":
        workers_export.hold()  # blocks this worker's event loop: it serves nothing else
        body = b"held"
    elif path == "/metrics" and workers_export.EXPORT == "route":
        page, kind = workers_export.metrics_page()
        body, content_type = page, kind.encode()
    else:
        status, body = 404, b"not found"
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


workers_export.booted()
