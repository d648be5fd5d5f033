"""The web part of ``python -m meterage demo --serve``: a small shop served by a real HTTP
server (the standard library's threading WSGI server) behind meterage's WSGI middleware,
under a built-in local load, so that ``/metrics`` and the per-route table show what a
service's own will show.

Routes: ``/products/{id}`` (CPU: renders a page), ``/search`` (IO: scans a file),
``/checkout`` (waits on a slow dependency: time without CPU), ``/report`` (hands its work to
a thread pool, charged to the request), and ``/admin`` (answers 500 now and then).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import os
import random
import re
import socketserver
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import meterage
from meterage.cli import table
from meterage.wsgi import MeterageMiddleware

#: The shop's routes: template, pattern, and the load's share of requests.
ROUTES = (
    ("/products/{id}", re.compile(r"^/products/(\d+)$"), 0.45),
    ("/search", re.compile(r"^/search$"), 0.25),
    ("/checkout", re.compile(r"^/checkout$"), 0.15),
    ("/report", re.compile(r"^/report$"), 0.10),
    ("/admin", re.compile(r"^/admin$"), 0.05),
)

Handler = Callable[[re.Match[str]], tuple[str, bytes]]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # the load would fill the terminal


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class Shop:
    """The application: a WSGI callable routing to the handlers below."""

    def __init__(self, directory: str) -> None:
        self.catalog = os.path.join(directory, "catalog.txt")
        with open(self.catalog, "w", encoding="ascii") as file:
            for number in range(20_000):
                file.write(f"product-{number} {number * 37 % 1000} widgets gadgets\n")
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        self.handlers: dict[str, Handler] = {
            "/products/{id}": self.product,
            "/search": self.search,
            "/checkout": self.checkout,
            "/report": self.report,
            "/admin": self.admin,
        }

    def product(self, match: re.Match[str]) -> tuple[str, bytes]:
        digest = match.group(1).encode()
        for _ in range(2_000):  # renders a page: pure CPU
            digest = hashlib.sha256(digest).digest()
        return "200 OK", digest.hex().encode()

    def search(self, match: re.Match[str]) -> tuple[str, bytes]:
        hits = 0
        with open(self.catalog, encoding="ascii") as file:  # scans the catalog: IO
            for line in file:
                hits += "gadgets" in line
        return "200 OK", str(hits).encode()

    def checkout(self, match: re.Match[str]) -> tuple[str, bytes]:
        time.sleep(0.02)  # a payment service's answer: wall time, no CPU
        return "200 OK", b"paid"

    def report(self, match: re.Match[str]) -> tuple[str, bytes]:
        # Handed to a thread pool: the work is still the request's.
        total = self.pool.submit(sum, range(300_000)).result()
        return "200 OK", str(total).encode()

    def admin(self, match: re.Match[str]) -> tuple[str, bytes]:
        if random.random() < 0.3:  # its backend is down: the error page (error.type 500)
            return "500 Internal Server Error", b"the admin backend is down"
        return "200 OK", b"ok"

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        for template, pattern, _ in ROUTES:
            match = pattern.match(path)
            if match is not None:
                call = meterage.current_call()
                if call is not None:
                    call.set_attribute("http.route", template)
                status, body = self.handlers[template](match)
                start_response(status, [("Content-Type", "text/plain")])
                return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]


class WebDemo:
    """The shop on a real server (a free loopback port unless given) and its load."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="meterage-web-")
        self.shop = Shop(self._directory.name)
        self.server = make_server(
            host,
            port,
            MeterageMiddleware(self.shop),
            server_class=_ThreadingServer,
            handler_class=_QuietHandler,
        )
        self.host, self.port = host, self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="meterage-web-demo", daemon=True
        )
        self._thread.start()
        self._random = random.Random(7)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def load(self, requests: int, concurrency: int = 4) -> int:
        """Sends ``requests`` requests over the routes (by their shares), ``concurrency`` at
        a time; returns how many were answered."""
        templates = self._random.choices(
            [template for template, _, _ in ROUTES],
            weights=[share for _, _, share in ROUTES],
            k=requests,
        )
        paths = [t.replace("{id}", str(self._random.randrange(1, 500))) for t in templates]
        answered = 0
        lock = threading.Lock()

        def one(path: str) -> None:
            nonlocal answered
            connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
            try:
                connection.request("GET", path)
                connection.getresponse().read()
                with lock:
                    answered += 1
            except (OSError, http.client.HTTPException):
                pass
            finally:
                connection.close()

        with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as clients:
            list(clients.map(one, paths))
        return answered

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
        self.shop.pool.shutdown()
        self._directory.cleanup()


def route_rows() -> list[tuple[str, ...]]:
    """The per-route cost table of the shop's requests so far: one row per route."""
    by_route: dict[str, list[meterage.Series]] = {}
    for series in meterage.snapshot():
        if series.operation == "http.server.request":
            route = str(series.attributes.get("http.route", "(no route)"))
            by_route.setdefault(route, []).append(series)
    rows: list[tuple[str, ...]] = []
    for route, group in sorted(by_route.items()):
        count = sum(series.count for series in group)
        errors = sum(series.count for series in group if "error.type" in series.attributes)
        duration = group[0].histograms["duration"]
        for series in group[1:]:
            duration = duration.merge(series.histograms["duration"])
        cpu = sum(series.estimated_total("cpu.time") for series in group if series.sampled)
        io = sum(
            series.estimated_total("io.read") + series.estimated_total("io.write")
            for series in group
            if series.sampled
        )
        probed = any(series.sampled for series in group)  # else no cost figure yet
        rows.append(
            (
                route,
                f"{count:,}",
                table.format_share(errors / count) if count else "n/a",
                table.format_seconds(duration.quantile(0.5)),
                table.format_seconds(duration.quantile(0.99)),
                table.format_seconds(cpu / count) if probed else "n/a",
                table.format_bytes(io / count) if probed else "n/a",
            )
        )
    return rows


ROUTE_HEADER = ("route", "requests", "errors", "p50", "p99", "CPU/request", "IO/request")


def format_routes() -> str:
    return table.render(ROUTE_HEADER, route_rows())
