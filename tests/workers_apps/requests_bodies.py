"""A Flask application for gunicorn whose requests end in many series (a status per POST),
each with body sizes known from the request, and whose streamed body reports whether the
request's call is current while it is made; a WSGI wrapper outside meterage's middleware
notes whether a call was current before each request started (left over from the last)."""

from __future__ import annotations

import json
from typing import Any

from flask import Flask, Response, request

import meterage
from meterage.wsgi import MeterageMiddleware

app = Flask(__name__)

#: Requests that found a call current before meterage's middleware started theirs.
leaked: list[str] = []


@app.post("/echo/<int:code>")
def echo(code: int) -> Response:
    body = request.get_data()
    return Response(body + body, status=code)


@app.get("/stream-current")
def stream_current() -> Response:
    call = meterage.current_call()
    assert call is not None

    def chunks() -> Any:
        for _ in range(3):
            yield b"1" if meterage.current_call() is call else b"0"

    response = Response(chunks(), mimetype="text/plain")
    response.call_on_close(
        lambda: (
            leaked.append("closed without its call")
            if meterage.current_call() is not call
            else None
        )
    )
    return response


@app.post("/reset")
def reset() -> str:
    meterage.reset()
    return "reset"


@app.get("/sizes")
def sizes() -> Response:
    requests_size = meterage.histogram("http.server.request.body.size")
    responses_size = meterage.histogram("http.server.response.body.size")
    rows = []
    for series in meterage.snapshot():
        if series.operation != "http.server.request" or not series.count:
            continue
        attributes = dict(series.attributes)
        received = requests_size.snapshot(attributes)
        sent = responses_size.snapshot(attributes)
        rows.append(
            {
                "attributes": attributes,
                "count": series.count,
                "request_count": received.count,
                "request_sum": received.sum,
                "response_count": sent.count,
                "response_sum": sent.sum,
            }
        )
    return Response(json.dumps({"rows": rows, "leaked": leaked}), mimetype="application/json")


metered = MeterageMiddleware(app.wsgi_app)


def application(environ: dict[str, Any], start_response: Any) -> Any:
    if meterage.current_call() is not None:
        leaked.append(environ.get("PATH_INFO", ""))
    return metered(environ, start_response)
