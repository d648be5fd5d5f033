"""A Flask application with no meterage code at all, for ``opentelemetry-instrument
gunicorn plain_flask:app``: URL rules with converters, a blueprint with a prefix, a
failing view, a streamed response."""

from __future__ import annotations

import os
from collections.abc import Iterator

from flask import Blueprint, Flask, Response

app = Flask(__name__)
api = Blueprint("api", __name__, url_prefix="/api")


@app.get("/")
def root() -> str:
    return str(os.getpid())


@app.get("/items/<int:item_id>")
def item(item_id: int) -> str:
    return str(item_id)


@app.get("/fail")
def fail() -> str:
    raise RuntimeError("the view failed")


@app.get("/stream")
def stream() -> Response:
    def chunks() -> Iterator[bytes]:
        for _ in range(4):
            yield b"x" * 1000

    return Response(chunks(), mimetype="text/plain")


@api.get("/users/<name>")
def user(name: str) -> str:
    return name


app.register_blueprint(api)
