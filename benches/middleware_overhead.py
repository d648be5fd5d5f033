"""Per-request cost of meterage's ASGI and WSGI middlewares alone, in process, over a
trivial application: thread CPU time of 20,000 requests per variant, three rounds.

    python benches/middleware_overhead.py

The figures quoted in docs/integrations.md and docs/benchmarks.md ("the in-process
microbenchmark of the middlewares alone") come from this script.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from meterage.asgi import MeterageMiddleware as AsgiMiddleware
from meterage.wsgi import MeterageMiddleware as WsgiMiddleware

REQUESTS = 20_000
SCOPE = {"type": "http", "method": "GET", "scheme": "http", "http_version": "1.1", "path": "/"}
ENVIRON = {
    "REQUEST_METHOD": "GET",
    "wsgi.url_scheme": "http",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "PATH_INFO": "/",
}


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hi"})


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Any) -> None:
    pass


def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hi"]


def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
    pass


async def asgi_ns(app: Any, n: int) -> float:
    began = time.thread_time_ns()
    for _ in range(n):
        await app(dict(SCOPE), receive, send)
    return (time.thread_time_ns() - began) / n


def wsgi_ns(app: Any, n: int) -> float:
    began = time.thread_time_ns()
    for _ in range(n):
        body = app(ENVIRON, start_response)
        for _chunk in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return (time.thread_time_ns() - began) / n


async def main() -> None:
    variants = {"timer-only": {"probes": ()}, "defaults": {}, "all probes": {"sample": 1.0}}
    asgi = {name: AsgiMiddleware(asgi_app, **settings) for name, settings in variants.items()}
    wsgi = {name: WsgiMiddleware(wsgi_app, **settings) for name, settings in variants.items()}
    for round_ in range(3):
        bare = await asgi_ns(asgi_app, REQUESTS)
        line = [f"round {round_ + 1}: ASGI bare {bare:.0f} ns"]
        for name, app in asgi.items():
            line.append(f"{name} +{await asgi_ns(app, REQUESTS) - bare:.0f}")
        bare = wsgi_ns(wsgi_app, REQUESTS)
        line.append(f"| WSGI bare {bare:.0f} ns")
        for name, app in wsgi.items():
            line.append(f"{name} +{wsgi_ns(app, REQUESTS) - bare:.0f}")
        print("  ".join(line))


if __name__ == "__main__":
    asyncio.run(main())
