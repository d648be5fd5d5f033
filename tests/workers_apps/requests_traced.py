"""A FastAPI application as a service runs it: OpenTelemetry's ASGI instrumentation makes
the server spans (every trace sampled unless the client's traceparent says otherwise),
meterage's middleware inside it meters each request with its default (adaptive) sampling,
and ``meterage.otel.configure()`` serves Prometheus (OTEL_METRICS_EXPORTER=prometheus).
``/work/{item_id}`` spends ``BURN_NS`` of thread CPU, ``/idle/{item_id}`` is the same
route without the burn (the framework's own cost); ``/spans`` answers the finished server
spans' attributes."""

from __future__ import annotations

import json
import os
import time

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import meterage.otel
from meterage.asgi import MeterageMiddleware

BURN_NS = int(os.environ.get("REQUESTS_APP_BURN_NS", "2000000"))

SPANS = InMemorySpanExporter()
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(SPANS))
trace.set_tracer_provider(tracer_provider)
meterage.otel.configure()

inner = FastAPI()


@inner.get("/")
async def root() -> PlainTextResponse:
    return PlainTextResponse(str(os.getpid()))


@inner.get("/work/{item_id}")
async def work(item_id: int) -> PlainTextResponse:
    began = time.thread_time_ns()
    while time.thread_time_ns() - began < BURN_NS:
        pass
    return PlainTextResponse(str(item_id))


@inner.get("/idle/{item_id}")
async def idle(item_id: int) -> PlainTextResponse:
    return PlainTextResponse(str(item_id))


@inner.get("/spans")
async def spans() -> Response:
    finished = [
        {"name": span.name, "kind": span.kind.name, "attributes": dict(span.attributes or {})}
        for span in SPANS.get_finished_spans()
    ]
    return Response(json.dumps(finished), media_type="application/json")


inner.add_middleware(MeterageMiddleware)
app = OpenTelemetryMiddleware(inner, tracer_provider=tracer_provider)
