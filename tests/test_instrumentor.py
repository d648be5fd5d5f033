"""meterage as an OpenTelemetry instrumentor (``meterage.integrations.instrumentor``), run
the way users run it: ``opentelemetry-instrument`` as a real command in front of a real
uvicorn or gunicorn serving an application that has no meterage code at all
(tests/workers_apps/plain_*.py), the SDK configured by OpenTelemetry's own configurator from
the OTEL_* variables, real HTTP requests, and the exporter's output read back: every
request is one call of ``http.server.request`` with its route template, exactly once.

The in-process parts (which providers it attaches and when, span attributes, uninstrument,
a framework imported before or after ``instrument()``) run in fresh interpreters: the
instrumentor patches frameworks and OpenTelemetry's globals for the whole process.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import http.client
import importlib.util
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import scenario
import servers
from servers import APPS, Service, free_port, load, wait_for

servers.require_modules(
    "opentelemetry.instrumentation",
    "opentelemetry.distro",
    "opentelemetry.exporter.prometheus",
    "opentelemetry.exporter.otlp.proto.http",
    "prometheus_client",
    "uvicorn",
    "gunicorn",
    "fastapi",
    "flask",
    "django",
)

from otlp_receiver import HttpReceiver, histogram_totals, resources  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

OPERATION = "http.server.request"
COUNT = "meterage_call_duration_seconds_count"
SERVICE_NAME = "meterage-instrumentor-test"
#: Requests per route.
N = 6
#: FastAPI >= 0.165 has telemetry of its own, on whenever a global SDK provider is set.
FASTAPI_TELEMETRY = importlib.util.find_spec("fastapi.telemetry") is not None

#: Route -> (the paths sent, the expected (http.route, status) of each): plain_fastapi.py.
FASTAPI_ROUTES = {
    "items": ([f"/items/{i}" for i in range(N)], ("/items/{item_id}", "200")),
    "sync": ([f"/sync/{i}" for i in range(N)], ("/sync/{number}", "200")),
    "router": ([f"/api/users/u{i}" for i in range(N)], ("/api/users/{name}", "200")),
    "mounted FastAPI": ([f"/sub/things/t{i}" for i in range(N)], ("/sub/things/{thing_id}", "200")),
    "mounted Starlette": ([f"/star/hello/w{i}" for i in range(N)], ("/star/hello/{who}", "200")),
    "failing": (["/fail"] * N, ("/fail", "500")),
    "unmatched": ([f"/nowhere/{i}" for i in range(N)], ("", "404")),
}
FLASK_ROUTES = {
    "items": ([f"/items/{i}" for i in range(N)], ("/items/<int:item_id>", "200")),
    "blueprint": ([f"/api/users/u{i}" for i in range(N)], ("/api/users/<name>", "200")),
    "streamed": (["/stream"] * N, ("/stream", "200")),
    "failing": (["/fail"] * N, ("/fail", "500")),
    "unmatched": ([f"/nowhere/{i}" for i in range(N)], ("", "404")),
}
DJANGO_ROUTES = {
    "items": ([f"/items/{i}" for i in range(N)], ("/items/<int:item_id>", "200")),
    "include": (
        [f"/articles/{2000 + i}/slug-{i}/" for i in range(N)],
        ("/articles/<int:year>/<slug:slug>/", "200"),
    ),
    "failing": (["/fail"] * N, ("/fail", "500")),
    "unmatched": ([f"/nowhere/{i}" for i in range(N)], ("", "404")),
}


# --- running servers under opentelemetry-instrument ------------------------------------


def instrument_command() -> str:
    """The ``opentelemetry-instrument`` script of this interpreter's environment."""
    return servers.require_binary(
        "opentelemetry-instrument",
        fallbacks=(str(Path(sys.executable).with_name("opentelemetry-instrument")),),
        hint="pip install opentelemetry-instrumentation (the test extra has it)",
    )


def environment(
    *,
    metrics_port: int | None = None,
    otlp: str | None = None,
    multiprocess: bool = False,
    disabled: str | None = None,
    traces: str = "none",
    **extra: str,
) -> dict[str, str]:
    """What the server starts with: no OTEL_* of this environment, the metrics exporter
    (Prometheus on ``metrics_port``, OTLP/HTTP to ``otlp``), ``traces`` as the traces
    exporter, no logs exporter, and ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=disabled``."""
    environ = servers.worker_environment(
        export="none",
        service_name=SERVICE_NAME,
        metrics_port=metrics_port,
        otlp=otlp,
        multiprocess=multiprocess,
        **extra,
    )
    environ.update(OTEL_TRACES_EXPORTER=traces, OTEL_LOGS_EXPORTER="none")
    if disabled is not None:
        environ["OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"] = disabled
    return environ


def instrumented_uvicorn(app: str, env: Mapping[str, str]) -> Any:
    """``opentelemetry-instrument python -m uvicorn app`` (one process) on a free port."""
    return servers.uvicorn(app, env=env, launcher=[instrument_command()])


def instrumented_gunicorn(app: str, env: Mapping[str, str], *, workers: int) -> Any:
    """``opentelemetry-instrument python -m gunicorn app`` with ``workers`` sync workers:
    OpenTelemetry's initialization (its configurator, then the instrumentors) runs in the
    master, which forks the workers."""
    return servers.gunicorn(app, workers=workers, env=env, launcher=[instrument_command()])


# --- what was sent, what came back -----------------------------------------------------


def send_all(service: Service, routes: Mapping[str, tuple[list[str], tuple[str, str]]]) -> None:
    """Sends every route's paths, one after another, and checks each got its status."""
    for name, (paths, (_, status)) in routes.items():
        for path in paths:
            result = load(service.url(path), 1, timeout=30)
            if status == "200":
                assert result.ok == 1, f"{name} {path}: {result.failures}"
            else:
                assert [f.split(":")[0] for f in result.failures] == [f"HTTP {status}"], (
                    f"{name} {path}: {result.failures}"
                )


def expected_counts(routes: Mapping[str, tuple[list[str], tuple[str, str]]]) -> dict[Any, int]:
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for paths, key in routes.values():
        counts[key] += len(paths)
    return dict(counts)


def page_of(port: int) -> str | None:
    try:
        return servers.http_get(f"http://127.0.0.1:{port}/metrics", timeout=5).decode()
    except (OSError, http.client.HTTPException):
        return None


def samples(page: str, name: str) -> list[Any]:
    return [
        sample
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == name
    ]


def request_counts(page: str) -> dict[tuple[str, str], int]:
    """(http.route, status) -> meterage's request count on a Prometheus page, less the
    readiness probes of "/" (how many there were depends on how fast the server started)."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for sample in samples(page, COUNT):
        labels = sample.labels
        if labels.get("meterage_operation") != OPERATION:
            continue
        key = (labels.get("http_route", ""), labels.get("http_response_status_code", ""))
        if key != ("/", "200"):
            counts[key] += int(sample.value)
    return dict(counts)


def scraped_counts(service: Service, port: int, expected: Mapping[Any, int]) -> dict[Any, int]:
    """meterage's request counts on the Prometheus page served on ``port``, once they are
    ``expected`` (a request's call ends just after its response is sent) or after 15 s."""
    seen: dict[Any, int] = {}

    def arrived() -> bool:
        nonlocal seen
        page = page_of(port)
        seen = request_counts(page) if page is not None else {}
        return seen == expected

    with contextlib.suppress(pytest.fail.Exception):
        wait_for(
            arrived, what="the requests on the metrics page", timeout=15, servers=[service.server]
        )
    return seen


def serving(port: int, service: Service) -> str:
    page = wait_for(
        lambda: page_of(port), what=f"a metrics page on {port}", servers=[service.server]
    )
    assert isinstance(page, str)
    return page


# --- Starlette and FastAPI under uvicorn -----------------------------------------------


def test_uvicorn_fastapi_every_request_is_one_call_of_its_route() -> None:
    """A FastAPI application with routes, an APIRouter, a sync route, a mounted FastAPI and
    a mounted Starlette application, failing and unmatched requests: each request is
    counted once, under its template (a mounted application's request is not counted
    again by the middleware added to the mounted application)."""
    metrics_port = free_port()
    with instrumented_uvicorn("plain_fastapi:app", environment(metrics_port=metrics_port)) as app:
        serving(metrics_port, app)
        send_all(app, FASTAPI_ROUTES)
        expected = expected_counts(FASTAPI_ROUTES)
        assert scraped_counts(app, metrics_port, expected) == expected


@pytest.mark.parametrize("disabled", ["meterage", "sqlite3 , meterage"])
def test_disabled_instrumentations_turn_it_off(disabled: str) -> None:
    """``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` naming ``meterage`` (alone, or in a list
    with spaces): no request is metered and meterage is not attached, while the SDK's
    exporter (and FastAPI's own telemetry, on with an SDK provider) works."""
    metrics_port = free_port()
    env = environment(metrics_port=metrics_port, disabled=disabled)
    with instrumented_uvicorn("plain_fastapi:app", env) as app:
        serving(metrics_port, app)
        result = load(app.url("/items/1"), N)
        assert result.ok == N, result.failures

        def fastapi_counted() -> str | None:
            page = page_of(metrics_port)
            if page is None or not FASTAPI_TELEMETRY:
                return page
            counted = any(
                s.labels.get("http_route") == "/items/{item_id}" and s.value == N
                for s in samples(page, "http_server_request_duration_seconds_count")
            )
            return page if counted else None

        page = wait_for(fastapi_counted, what="FastAPI's own count", servers=[app.server])
        names = {s.name for family in text_string_to_metric_families(page) for s in family.samples}
        assert not [name for name in names if name.startswith("meterage_")], sorted(names)


def test_fastapi_request_metrics_are_not_exported_twice() -> None:
    """FastAPI >= 0.165 records ``http.server.request.duration`` itself whenever a global
    SDK meter provider is set (opentelemetry-instrument sets one). Where meterage exports
    the same metric (its alias of the request series), the applications it meters leave
    FastAPI's off, so that each request is in ``http.server.request.duration`` once;
    otherwise FastAPI's stays, next to meterage's own ``meterage.call.duration``."""
    from meterage.integrations import instrumentor

    metrics_port = free_port()
    with instrumented_uvicorn("plain_fastapi:app", environment(metrics_port=metrics_port)) as app:
        serving(metrics_port, app)
        result = load(app.url("/items/7"), N)
        assert result.ok == N, result.failures
        expected = {("/items/{item_id}", "200"): N}
        assert scraped_counts(app, metrics_port, expected) == expected
        page = page_of(metrics_port)
        assert page is not None
        by_scope: collections.Counter[str] = collections.Counter()
        for sample in samples(page, "http_server_request_duration_seconds_count"):
            if sample.labels.get("http_route") == "/items/{item_id}":
                by_scope[sample.labels.get("otel_scope_name", "")] += int(sample.value)
        if instrumentor._exports_request_duration():
            assert by_scope == {"meterage": N}
        else:
            assert by_scope == ({"fastapi": N} if FASTAPI_TELEMETRY else {})


def test_an_application_that_meters_itself_is_metered_once() -> None:
    """requests_fastapi.py adds ``MeterageMiddleware(sample=1.0)`` itself and mounts a
    FastAPI application without it: its middleware meters each request (every one probed,
    its own setting), the instrumentor's adds nothing, and the mounted application's
    requests are counted once."""
    metrics_port = free_port()
    env = environment(metrics_port=metrics_port)
    with instrumented_uvicorn("requests_fastapi:app", env) as app:
        serving(metrics_port, app)
        for path in ("/api/items/1", "/sub/things/a"):
            result = load(app.url(path), N)
            assert result.ok == N, result.failures
        expected = {("/api/items/{item_id}", "200"): N, ("/sub/things/{thing_id}", "200"): N}
        assert scraped_counts(app, metrics_port, expected) == expected
        charged = json.loads(servers.http_get(app.url("/charged"), timeout=10))["rows"]
        rows = {row["attributes"].get("http.route"): row for row in charged}
        assert rows["/api/items/{item_id}"]["sampled"] == N  # the app's own sample=1.0


# --- Flask and Django under gunicorn, Django under uvicorn -----------------------------


def test_gunicorn_flask_workers_push_their_requests_over_otlp() -> None:
    """The distro's default exporter, OTLP: gunicorn's master initializes OpenTelemetry and
    forks two workers; the SDK gives each process its own ``service.instance.id`` and
    restarts its periodic reader in each worker, so each worker pushes the requests it
    served. Summed over the processes, each route has exactly its requests."""
    with HttpReceiver() as receiver:
        env = environment(otlp=receiver.endpoint)
        with instrumented_gunicorn("plain_flask:app", env, workers=2) as app:
            send_all(app, FLASK_ROUTES)
            expected = expected_counts(FLASK_ROUTES)

            def pushed() -> dict[tuple[str, str], int]:
                latest: dict[tuple[str, str, Any], int] = {}
                for request in receiver.requests:  # cumulative: each process's latest
                    (resource,) = resources(request)
                    instance = resource.get("service.instance.id")
                    for route, status in expected:
                        count, _ = histogram_totals(
                            request,
                            "meterage.call.duration",
                            **{"meterage.operation": OPERATION},
                            **({"http.route": route} if route else {}),
                            **{"http.response.status_code": int(status)},
                        )
                        latest[(route, status, instance)] = count
                totals: collections.Counter[tuple[str, str]] = collections.Counter()
                for (route, status, _), count in latest.items():
                    totals[(route, status)] += count
                return dict(totals)

            seen: dict[tuple[str, str], int] = {}

            def instances() -> set[Any]:
                return {
                    resource.get("service.instance.id")
                    for request in receiver.requests
                    for resource in resources(request)
                }

            def arrived() -> bool:
                nonlocal seen
                seen = pushed()
                # The master pushes too (on its own interval): wait for its first push.
                return seen == expected and len(instances()) == 3

            with contextlib.suppress(pytest.fail.Exception):
                wait_for(arrived, what="the pushed requests", timeout=15, servers=[app.server])
            assert seen == expected
            # Each process pushes with its own service.instance.id: the master's, each worker's.
            assert len(instances()) == 3, instances()


@pytest.mark.parametrize(
    ("app", "routes"),
    [("plain_flask:app", FLASK_ROUTES), ("plain_django:application", DJANGO_ROUTES)],
    ids=["flask", "django"],
)
def test_gunicorn_prometheus_in_multiprocess_mode(app: str, routes: Any) -> None:
    """Prometheus under gunicorn: the SDK's configurator starts the scrape endpoint in the
    master, which serves no request; with ``METERAGE_MULTIPROCESS=1`` its page has the
    whole group's request series. Flask's URL rules and Django's resolved patterns are the
    routes."""
    metrics_port = free_port()
    env = environment(metrics_port=metrics_port, multiprocess=True)
    with instrumented_gunicorn(app, env, workers=2) as service:
        serving(metrics_port, service)
        send_all(service, routes)
        expected = expected_counts(routes)
        assert scraped_counts(service, metrics_port, expected) == expected


def test_uvicorn_django_asgi() -> None:
    """Django's ASGI handler under uvicorn: metered, with the resolved patterns."""
    metrics_port = free_port()
    env = environment(metrics_port=metrics_port)
    with instrumented_uvicorn("plain_django:asgi_application", env) as app:
        serving(metrics_port, app)
        send_all(app, DJANGO_ROUTES)
        expected = expected_counts(DJANGO_ROUTES)
        assert scraped_counts(app, metrics_port, expected) == expected
        assert servers.http_get(app.url("/items/3")) == b"3"


@pytest.mark.parametrize(
    ("app", "env", "path", "route"),
    [
        ("requests_flask:app", {}, "/items/1", "/items/<int:item_id>"),
        (
            "django_site.wsgi:application",
            {"DJANGO_SETTINGS_MODULE": "django_site.settings"},
            "/items/1",
            "/items/<int:item_id>",
        ),
    ],
    ids=["flask", "django"],
)
def test_gunicorn_an_application_that_meters_itself_once(
    app: str, env: dict[str, str], path: str, route: str
) -> None:
    """A Flask application wrapping its ``wsgi_app`` in meterage's middleware after it is
    made, and a Django project wrapping its WSGI handler (with RouteMiddleware in its
    settings): each request counted once."""
    metrics_port = free_port()
    environ = environment(metrics_port=metrics_port, multiprocess=True, **env)
    with instrumented_gunicorn(app, environ, workers=1) as service:
        serving(metrics_port, service)
        result = load(service.url(path), N)
        assert result.ok == N, result.failures
        expected = {(route, "200"): N}
        assert scraped_counts(service, metrics_port, expected) == expected


# --- in a fresh interpreter ------------------------------------------------------------

PRELUDE = """
import asyncio, json, sys
import meterage

def done(**seen):
    print("RESULT " + json.dumps(seen), flush=True)

def requests(route=None):
    return sum(
        s.count for s in meterage.snapshot()
        if s.operation == "http.server.request"
        and (route is None or s.attributes.get("http.route") == route)
    )

def asgi_get(app, path):
    sent = []
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}
    async def send(message):
        sent.append(message)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": [(b"host", b"testserver")],
             "server": ("testserver", 80), "client": ("127.0.0.1", 1234)}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"]

def wsgi_get(app, path):
    from wsgiref.util import setup_testing_defaults
    environ = {"PATH_INFO": path}
    setup_testing_defaults(environ)
    statuses = []
    body = app(environ, lambda status, headers, exc_info=None: statuses.append(status))
    b"".join(body)
    getattr(body, "close", lambda: None)()
    return int(statuses[0][:3])
"""

run = functools.partial(scenario.run, PRELUDE, multiprocess=False)


def test_entry_point_and_dependencies() -> None:
    """The entry point opentelemetry-instrument loads, and why it loads with any of the
    frameworks: no dependency of the instrumentor itself, none in the distribution's
    ``instruments`` extras that the loader checks."""
    from importlib.metadata import distribution, entry_points

    from opentelemetry.instrumentation.dependencies import get_dist_dependency_conflicts

    (entry,) = [e for e in entry_points(group="opentelemetry_instrumentor") if e.name == "meterage"]
    assert entry.value == "meterage.integrations.instrumentor:MeterageInstrumentor"
    instrumentor = entry.load()
    assert tuple(instrumentor().instrumentation_dependencies()) == ()
    assert get_dist_dependency_conflicts(distribution("meterage")) is None


def test_a_provider_set_after_instrument_is_attached_with_span_attributes() -> None:
    """instrument() before any provider is set (a distribution that configures later, or
    code that calls it first): meterage attaches to the meter provider once it is set, and
    span attributes come on once the tracer provider is: the request's cost is on the
    server span that holds it (a tracing middleware ending its span after the
    application, as OpenTelemetry's ASGI middleware does)."""
    seen = run(
        """
        from meterage.integrations.instrumentor import MeterageInstrumentor
        MeterageInstrumentor().instrument()

        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        import meterage.otel

        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        attached_before = list(meterage.otel.attached_providers())
        metrics.set_meter_provider(provider)
        spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
        trace.set_tracer_provider(tracer_provider)

        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        async def hello(request):
            return PlainTextResponse("hi")

        app = Starlette(routes=[Route("/hello/{who}", hello)])
        tracer = trace.get_tracer("server")

        async def traced(scope, receive, send):  # a server span around the application
            with tracer.start_as_current_span("GET", kind=trace.SpanKind.SERVER):
                await app(scope, receive, send)

        status = asgi_get(traced, "/hello/x")
        data = reader.get_metrics_data()
        exported = sum(
            point.count
            for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            if m.name == "meterage.call.duration"
            for point in m.data.data_points
            if point.attributes.get("meterage.operation") == "http.server.request"
        )
        (span,) = spans.get_finished_spans()
        done(status=status, attached_before=len(attached_before),
             attached=[p is provider for p in meterage.otel.attached_providers()],
             exported=exported, span={k: v for k, v in span.attributes.items()
                                      if k in ("meterage.calls",)},
             has_duration=span.attributes.get("meterage.duration", 0) > 0)
        """
    )
    assert seen["status"] == 200
    assert seen["attached_before"] == 0 and seen["attached"] == [True]
    assert seen["exported"] == 1
    assert seen["span"] == {"meterage.calls": 1} and seen["has_duration"]


def test_an_application_attached_already_keeps_its_choices() -> None:
    """A provider the application attached itself (here without process metrics) is left
    as it is: instrument() does not attach it again with its defaults."""
    seen = run(
        """
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        import meterage.otel

        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        metrics.set_meter_provider(provider)
        meterage.otel.attach(provider, process=False)
        from meterage.integrations.instrumentor import MeterageInstrumentor
        MeterageInstrumentor().instrument()
        names = {m.name for rm in reader.get_metrics_data().resource_metrics
                 for sm in rm.scope_metrics for m in sm.metrics}
        done(process=sorted(n for n in names if n.startswith("process.")))
        """
    )
    assert seen["process"] == []


@pytest.mark.parametrize("imported_first", [False, True], ids=["imported-after", "imported-before"])
def test_uninstrument_undoes_it_for_applications_made_afterwards(imported_first: bool) -> None:
    """Applications of each framework made while instrumented are metered (whether the
    framework was imported before ``instrument()`` or after), those made after
    ``uninstrument()`` are not, and nothing of meterage's is left in the frameworks or in
    the import system."""
    seen = run(
        f"""
        if {imported_first!r}:
            import django.core.handlers.wsgi, fastapi, flask, starlette.applications
        import django
        from django.conf import settings
        settings.configure(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"], MIDDLEWARE=[],
                           SECRET_KEY="test")
        django.setup()
        from django.http import HttpResponse
        from django.urls import path
        urlpatterns = [path("items/<int:item_id>", lambda request, item_id: HttpResponse("x"))]

        from meterage.integrations.instrumentor import MeterageInstrumentor
        instrumentor = MeterageInstrumentor()
        instrumentor.instrument()

        from django.core.handlers.wsgi import WSGIHandler
        from fastapi import FastAPI
        from flask import Flask
        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        async def hello(request):
            return PlainTextResponse("hi")

        def apps():
            fast = FastAPI()
            fast.get("/fast/{{x}}")(lambda x: "x")
            star = Starlette(routes=[Route("/star/{{x}}", hello)])
            fl = Flask("plain")
            fl.get("/flask/<x>")(lambda x: "x")
            return fast, star, fl

        fast, star, fl = apps()
        handler = WSGIHandler()
        counts = {{}}

        def served(label, get, app, path):
            before = requests()
            status = get(app, path)
            assert status == 200, (label, status)
            counts[label] = requests() - before

        served("fastapi", asgi_get, fast, "/fast/1")
        served("starlette", asgi_get, star, "/star/1")
        served("flask", wsgi_get, fl, "/flask/1")
        served("django", wsgi_get, handler, "/items/1")

        instrumentor.uninstrument()
        fast2, star2, fl2 = apps()
        handler2 = WSGIHandler()
        served("fastapi after", asgi_get, fast2, "/fast/1")
        served("starlette after", asgi_get, star2, "/star/1")
        served("flask after", wsgi_get, fl2, "/flask/1")
        served("django after", wsgi_get, handler2, "/items/1")
        served("fastapi made before", asgi_get, fast, "/fast/2")

        from meterage.integrations import instrumentor as module
        left = [type(f).__name__ for f in sys.meta_path if type(f).__module__ == module.__name__]
        from django.core.handlers.asgi import ASGIHandler
        from django.core.handlers.base import BaseHandler
        from opentelemetry import trace
        from opentelemetry.metrics import _internal as metrics_internal
        originals = [
            hasattr(function, "__meterage_original__")
            for function in (
                Starlette.build_middleware_stack, FastAPI.build_middleware_stack, Flask.__init__,
                BaseHandler.load_middleware, WSGIHandler.__call__, ASGIHandler.__call__,
                metrics_internal._set_meter_provider, trace._set_tracer_provider,
            )
        ]
        done(counts=counts, left=left, patched=originals,
             routes=sorted(s.attributes.get("http.route") for s in meterage.snapshot()
                           if s.operation == "http.server.request"))
        """
    )
    assert seen["counts"] == {
        "fastapi": 1,
        "starlette": 1,
        "flask": 1,
        "django": 1,
        "fastapi after": 0,
        "starlette after": 0,
        "flask after": 0,
        "django after": 0,
        "fastapi made before": 1,  # its middleware was in place already
    }
    assert seen["routes"] == ["/fast/{x}", "/flask/<x>", "/items/<int:item_id>", "/star/{x}"]
    assert seen["left"] == [] and seen["patched"] == [False] * 8


def test_an_application_wrapped_whole_is_metered_once() -> None:
    """``MeterageMiddleware(FastAPI())``: the application's own middleware, outside the
    one the instrumentor put in FastAPI's stack, meters the request; the inner one steps
    aside. A middleware list that has meterage's gets no second one."""
    seen = run(
        """
        from meterage.integrations.instrumentor import MeterageInstrumentor
        MeterageInstrumentor().instrument()
        from fastapi import FastAPI
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route
        from meterage.asgi import MeterageMiddleware

        inner = FastAPI()
        inner.get("/a/{x}")(lambda x: "x")
        wrapped = MeterageMiddleware(inner, sample=1.0)

        async def hello(request):
            return PlainTextResponse("hi")

        listed = Starlette(routes=[Route("/b", hello)], middleware=[Middleware(MeterageMiddleware)])
        statuses = [asgi_get(wrapped, "/a/1"), asgi_get(listed, "/b")]
        listed_stack, node = [], listed.middleware_stack
        while node is not None and len(listed_stack) < 10:
            listed_stack.append(type(node).__name__)
            node = getattr(node, "app", None)
        (series,) = [s for s in meterage.snapshot() if s.operation == "http.server.request"
                     and s.attributes.get("http.route") == "/a/{x}"]
        done(statuses=statuses, a=requests("/a/{x}"), b=requests("/b"), sampled=series.sampled,
             meterage_in_stack=listed_stack.count("MeterageMiddleware")
             + listed_stack.count("_ASGI"))
        """
    )
    assert seen["statuses"] == [200, 200]
    assert seen["a"] == 1 and seen["sampled"] == 1  # the application's own (sample=1.0)
    assert seen["b"] == 1 and seen["meterage_in_stack"] == 1


def test_bad_settings_raise_before_anything_is_hooked() -> None:
    seen = run(
        """
        from meterage.integrations.instrumentor import MeterageInstrumentor
        try:
            MeterageInstrumentor().instrument(sample=2.0)
        except ValueError as error:
            message = str(error)
        import starlette.applications
        done(message=message, instrumented=MeterageInstrumentor().is_instrumented_by_opentelemetry,
             hooked=hasattr(starlette.applications.Starlette.build_middleware_stack,
                            "__meterage_original__"))
        """
    )
    assert "sample" in seen["message"]
    assert seen["instrumented"] is False and seen["hooked"] is False


def test_the_test_apps_have_no_meterage_code() -> None:
    for name in ("plain_fastapi.py", "plain_flask.py", "plain_django.py"):
        code = (APPS / name).read_text()
        assert not re.search(r"^\s*(import|from)\s+meterage", code, re.MULTILINE), name


@pytest.fixture(autouse=True)
def _no_stray_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # scenario.run inherits this environment: no OTEL_* of the developer's shell.
    for key in list(os.environ):
        if key.startswith("OTEL_"):
            monkeypatch.delenv(key)
