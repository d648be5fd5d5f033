"""A plain WSGI app (no framework) with one metered route, for gunicorn's sync workers.

Routes: ``/`` answers this process's PID (not metered: readiness), ``/work`` runs one
metered call (operation ``OPERATION``) and answers its PID, ``/block`` holds its worker (see
``workers_export.hold``) outside any metered call, ``/held`` inside one (operation
``HELD``), and ``/metrics`` is the app's own scrape page when
``WORKERS_APP_EXPORT=route``. The export is set up when the module is imported: in each
worker, or in the master with ``--preload``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

import workers_export

import meterage

OPERATION = "workers.wsgi.work"
HELD = "workers.wsgi.held"

workers_export.setup()


@meterage.meter(OPERATION, probes=("cpu",), sample=1.0)
def work() -> bytes:
    # Holds this sync worker a moment, so that concurrent requests spread over the workers.
    time.sleep(0.005)
    return str(os.getpid()).encode()


@meterage.meter(HELD, sample=1.0)
def held() -> bytes:
    workers_export.hold("held")  # a metered call in flight when the test kills its worker
    return b"held"


def app(environ: dict, start_response: Callable[..., object]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    content_type = "text/plain; charset=utf-8"
    status = "200 OK"
    if path == "/work":
        body = work()
    elif path == "/":
        body = str(os.getpid()).encode()
    elif path == "/block":
        workers_export.hold()
        body = b"held"
    elif path == "/held":
        body = held()
    elif path == "/metrics" and workers_export.EXPORT == "route":
        body, content_type = workers_export.metrics_page()
    else:
        status, body = "404 Not Found", b"not found"
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


workers_export.booted()
