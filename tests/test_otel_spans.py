"""Span attributes: the totals of metered calls land on the SDK span they ran in."""

from __future__ import annotations

import asyncio
import os

import pytest

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

import meterage
import meterage.otel
from meterage import _native


@pytest.fixture
def tracing():
    """An SDK tracer provider with span attributes on, and the spans it finished."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    assert meterage.otel.span_attributes(provider) is True
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    meterage.otel.span_attributes(enabled=False)
    provider.shutdown()


def finished(exporter, name):
    (span,) = [span for span in exporter.get_finished_spans() if span.name == name]
    return dict(span.attributes)


def test_calls_in_a_span_add_up_on_it(tmp_path, unique, tracing):
    tracer, exporter = tracing
    path = tmp_path / "out.bin"

    @meterage.meter(unique(), sample=1.0)
    def write(size):
        with open(path, "ab", buffering=0) as handle:
            handle.write(b"x" * size)

    with tracer.start_as_current_span("request"):
        write(1000)
        write(234)
        with meterage.meter(unique(), probes=()):
            pass
    attributes = finished(exporter, "request")
    assert attributes["meterage.calls"] == 3
    assert attributes["meterage.probed_calls"] == 2
    # The bytes the two probed calls wrote, exactly.
    assert attributes["meterage.io.write"] == 1234
    assert attributes["meterage.io.read"] == 0
    assert 0 < attributes["meterage.duration"] < 5
    assert 0 < attributes["meterage.cpu.time"] <= attributes["meterage.duration"]
    assert _native.pending_span_count() == 0


def test_calls_are_charged_to_the_innermost_span(unique, tracing):
    tracer, exporter = tracing
    work = meterage.meter(unique(), probes=())(lambda: None)
    with tracer.start_as_current_span("outer"):
        work()
        with tracer.start_as_current_span("inner"):
            work()
            work()
    assert finished(exporter, "outer")["meterage.calls"] == 1
    assert finished(exporter, "inner")["meterage.calls"] == 2


def test_a_span_without_metered_calls_gets_nothing(tracing):
    tracer, exporter = tracing
    with tracer.start_as_current_span("quiet"):
        pass
    assert not any(key.startswith("meterage.") for key in finished(exporter, "quiet"))


def test_coroutines_report_to_the_span_they_ran_in(unique, tracing):
    tracer, exporter = tracing

    @meterage.meter(unique(), probes=("cpu",), sample=1.0)
    async def fetch():
        await asyncio.sleep(0.001)
        return 1

    async def main():
        with tracer.start_as_current_span("async-request"):
            return await asyncio.gather(fetch(), fetch())

    assert asyncio.run(main()) == [1, 1]
    attributes = finished(exporter, "async-request")
    assert attributes["meterage.calls"] == 2
    assert attributes["meterage.probed_calls"] == 2
    assert "meterage.cpu.time" in attributes


def test_off_means_nothing_is_kept(unique):
    meterage.otel.span_attributes(enabled=False)
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    work = meterage.meter(unique(), probes=())(lambda: None)
    with provider.get_tracer("t").start_as_current_span("untracked"):
        work()
        assert _native.pending_span_count() == 0
    assert not any(key.startswith("meterage.") for key in finished(exporter, "untracked"))
    provider.shutdown()


def test_no_sdk_tracer_provider_means_off():
    from opentelemetry.trace import NoOpTracerProvider

    with pytest.raises(TypeError, match="TracerProvider"):
        meterage.otel.span_attributes(NoOpTracerProvider())


def test_a_forked_process_is_not_confused_by_the_parent_spans(unique, tracing):
    tracer, exporter = tracing
    work = meterage.meter(unique(), probes=())(lambda: None)
    with tracer.start_as_current_span("parent-side"):
        work()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            work()
            os.write(write_end, b"ok")
            os._exit(0)
        os.close(write_end)
        assert os.read(read_end, 2) == b"ok"
        os.waitpid(pid, 0)
    # The child's call was its own business: the parent's span saw one call.
    assert finished(exporter, "parent-side")["meterage.calls"] == 1


def test_duration_points_carry_exemplars_of_traced_calls(unique, tracing):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    tracer, _ = tracing
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=False)
    try:
        name = unique()
        work = meterage.meter(name, probes=())(lambda: None)
        with tracer.start_as_current_span("traced") as span:
            work()
            context = span.get_span_context()
        work()  # outside any span: no exemplar
        data = reader.get_metrics_data()
        (duration,) = [
            metric
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == "meterage.call.duration"
        ]
        (point,) = [
            p for p in duration.data.data_points if p.attributes["meterage.operation"] == name
        ]
        assert point.count == 2
        (exemplar,) = point.exemplars
        assert exemplar.trace_id == context.trace_id
        assert exemplar.span_id == context.span_id
        assert point.min <= exemplar.value <= point.max
        # It sits in the bucket its value belongs to (the first: far below 5 ms).
        assert exemplar.value <= point.explicit_bounds[0]
        (series,) = [s for s in meterage.snapshot() if s.operation == name]
        assert [(trace, span_id) for _, _, trace, span_id in series.exemplars] == [
            (context.trace_id, context.span_id)
        ]
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()


def test_the_openmetrics_exposition_carries_the_exemplars(unique, tracing):
    prometheus_exporter = pytest.importorskip("opentelemetry.exporter.prometheus")
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import REGISTRY
    from prometheus_client.openmetrics.exposition import generate_latest

    tracer, _ = tracing
    reader = prometheus_exporter.PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=False)
    try:
        name = unique()
        work = meterage.meter(name, probes=())(lambda: None)
        with tracer.start_as_current_span("scraped") as span:
            work()
            context = span.get_span_context()
        lines = [
            line
            for line in generate_latest(REGISTRY).decode().splitlines()
            if line.startswith("meterage_call_duration_seconds_bucket") and name in line
        ]
        with_exemplar = [line for line in lines if " # {" in line]
        # One call, so one exemplar: on the first bucket (the call took far less than 5 ms).
        assert len(with_exemplar) == 1, lines
        assert 'le="0.005"' in with_exemplar[0]
        assert f'trace_id="{context.trace_id:032x}"' in with_exemplar[0]
        assert f'span_id="{context.span_id:016x}"' in with_exemplar[0]
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()
