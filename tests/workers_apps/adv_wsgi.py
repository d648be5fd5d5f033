"""An adversarial Flask application metered by meterage's WSGI middleware, for gunicorn
(sync or gthread workers).

In-flight counting is on (``meterage.otel.attach`` on an SDK MeterProvider). Routes:
``/items/<int:item_id>``; ``/boom`` raises; ``/stream`` streams a generator;
``/stream/fails`` raises in the middle of its stream; ``/file`` sends a file with
``send_file`` (gunicorn's ``wsgi.file_wrapper``, which gunicorn sends with sendfile(2));
``/sendfiles`` answers how many responses gunicorn sent with sendfile in this worker
(gunicorn's own ``Response.sendfile`` is watched, not replaced); ``/charged`` answers what
meterage recorded for requests, with the calls in flight.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import Any

import gunicorn.http.wsgi
from flask import Flask, Response, send_file, stream_with_context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import meterage
import meterage.otel
from meterage.wsgi import MeterageMiddleware

_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
meterage.otel.attach(_provider, process=False, spans=False, host=False)

FILE = os.path.join(tempfile.mkdtemp(prefix="meterage-adv-wsgi-"), "payload.bin")
with open(FILE, "wb") as payload:
    payload.write(b"0123456789abcdef" * 4096)  # 64 KiB

_sent_with_sendfile = 0
_lock = threading.Lock()
_original_sendfile = gunicorn.http.wsgi.Response.sendfile


def _watched_sendfile(self: Any, respiter: Any) -> bool:
    global _sent_with_sendfile
    sent: bool = _original_sendfile(self, respiter)
    if sent:
        with _lock:
            _sent_with_sendfile += 1
    return sent


gunicorn.http.wsgi.Response.sendfile = _watched_sendfile  # type: ignore[method-assign]

app = Flask(__name__)


@app.get("/")
def root() -> str:
    return "ok"


@app.get("/items/<int:item_id>")
def item(item_id: int) -> dict[str, int]:
    return {"item": item_id}


@app.get("/boom")
def boom() -> str:
    raise LookupError("boom")


@app.get("/stream")
def stream() -> Response:
    def chunks() -> Any:
        for index in range(3):
            yield f"chunk{index}\n"

    return Response(stream_with_context(chunks()), mimetype="text/plain")


@app.get("/file")
def file() -> Response:
    return send_file(FILE, mimetype="application/octet-stream")


@app.get("/sendfiles")
def sendfiles() -> str:
    return str(_sent_with_sendfile)


@app.get("/charged")
def charged() -> Response:
    rows = [
        {"attributes": s.attributes, "count": s.count, "active": s.active}
        for s in meterage.snapshot()
        if s.operation == "http.server.request"
    ]
    return Response(json.dumps({"rows": rows}), mimetype="application/json")


bare = app.wsgi_app
app.wsgi_app = MeterageMiddleware(app.wsgi_app)  # type: ignore[method-assign]


def unmetered(environ: Any, start_response: Any) -> Any:
    """The same Flask application without meterage (what the server does without it)."""
    return bare(environ, start_response)
