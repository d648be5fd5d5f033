"""The applications ``benches/requests_servers.py`` serves: the same FastAPI and Flask routes
as ``benches/requests_overhead.py`` (``GET /`` answers ``ok``), with the instrumentation
that ``REQUESTS_BENCH_VARIANT`` names (a variant of ``requests_overhead.VARIANTS``).

    uvicorn requests_server_app:fastapi_app --app-dir benches
    gunicorn requests_server_app:flask_app --pythonpath benches
"""

from __future__ import annotations

import os
from typing import Any

import requests_overhead

VARIANT = os.environ.get("REQUESTS_BENCH_VARIANT", "bare")
_built: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    """``fastapi_app`` and ``flask_app``, built on first use (a server imports only one)."""
    kinds = {"fastapi_app": "fastapi", "flask_app": "flask"}
    if name not in kinds:
        raise AttributeError(name)
    if name not in _built:
        _built[name] = requests_overhead.build_app(kinds[name], VARIANT)
    return _built[name]
