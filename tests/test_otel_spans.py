"""Span attributes: the totals of metered calls land on the SDK span they ran in."""

from __future__ import annotations

import asyncio
import collections
import ctypes
import faulthandler
import gc
import os
import threading
import weakref

import pytest

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

import meterage
import meterage.otel
from meterage import _native


@pytest.fixture(autouse=True)
def _return_freed_memory():
    """Tests here free thousands of spans at once; glibc then serves later large
    allocations from those already-touched heap pages, which would hide the page faults
    that later probe tests count. Hand the freed memory back to the system."""
    yield
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass


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


# The native table's bound (spans.rs MAX_PENDING_SPANS): more spans than this never fit.
MAX_PENDING_SPANS = 8192
# Enough spans to overflow the table with room to spare.
MANY = 10_000


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


def metered_in(span, work, calls=1):
    """Makes ``calls`` metered calls with ``span`` current, without ending it."""
    with trace.use_span(span, end_on_exit=False):
        for _ in range(calls):
            work()


def test_spans_that_never_end_are_freed_and_later_spans_still_get_totals(unique, tracing):
    tracer, exporter = tracing
    work = meterage.meter(unique(), probes=())(lambda: None)
    lost = []
    for index in range(MANY):
        span = tracer.start_span(f"lost-{index}")
        metered_in(span, work)
        lost.append(weakref.ref(span))
        assert _native.pending_span_count() <= MAX_PENDING_SPANS
    # Each went as the next replaced it (no cycle): its slot went with it, at once.
    assert _native.pending_span_count() == 1
    del span
    gc.collect()
    # Nothing meterage holds keeps a dropped span alive, and its slot goes with it.
    assert [ref for ref in lost if ref() is not None] == []
    assert _native.pending_span_count() == 0
    with tracer.start_as_current_span("after"):
        work()
        work()
    assert finished(exporter, "after")["meterage.calls"] == 2
    assert _native.pending_span_count() == 0


def test_a_table_full_of_live_unended_spans_still_takes_new_spans(unique, tracing):
    tracer, exporter = tracing
    work = meterage.meter(unique(), probes=())(lambda: None)
    kept = [tracer.start_span(f"kept-{index}") for index in range(MANY)]
    for span in kept:
        metered_in(span, work)
        assert _native.pending_span_count() <= MAX_PENDING_SPANS
    assert _native.pending_span_count() == MAX_PENDING_SPANS
    with tracer.start_as_current_span("after"):
        work()
        work()
        work()
    assert finished(exporter, "after")["meterage.calls"] == 3
    refs = [weakref.ref(span) for span in kept]
    del kept, span
    gc.collect()
    assert [ref for ref in refs if ref() is not None] == []
    assert _native.pending_span_count() == 0


def test_spans_ended_without_meterage_processor_do_not_block_later_spans(unique, tracing):
    tracer, exporter = tracing
    # A second provider, without meterage's processor, whose exporter keeps every ended
    # span alive: their totals are never taken.
    other_exporter = InMemorySpanExporter()
    other = TracerProvider()
    other.add_span_processor(SimpleSpanProcessor(other_exporter))
    other_tracer = other.get_tracer("other")
    work = meterage.meter(unique(), probes=())(lambda: None)
    try:
        for index in range(MANY):
            with other_tracer.start_as_current_span(f"other-{index}"):
                work()
            assert _native.pending_span_count() <= MAX_PENDING_SPANS
        assert len(other_exporter.get_finished_spans()) == MANY
        with tracer.start_as_current_span("processed"):
            work()
            work()
        assert finished(exporter, "processed")["meterage.calls"] == 2
        ended = [weakref.ref(span) for span in other_exporter.get_finished_spans()]
        assert not any(key.startswith("meterage.") for key in ended[-1]().attributes)
        other_exporter.clear()
        gc.collect()
        assert [ref for ref in ended if ref() is not None] == []
        assert _native.pending_span_count() == 0
    finally:
        other.shutdown()


def test_a_long_lived_span_keeps_its_totals_while_dropped_spans_churn(unique, tracing):
    tracer, exporter = tracing
    work = meterage.meter(unique(), probes=())(lambda: None)
    patient = tracer.start_span("patient")
    metered_in(patient, work, calls=3)
    # Many short-lived spans come and go (and reuse addresses): each frees its slot.
    for index in range(MANY):
        metered_in(tracer.start_span(f"churn-{index}"), work, calls=2)
    metered_in(patient, work, calls=1)
    patient.end()
    assert finished(exporter, "patient")["meterage.calls"] == 4


def test_an_evicted_span_gets_no_totals_rather_than_partial_or_foreign_ones(unique, tracing):
    tracer, exporter = tracing
    work = meterage.meter(unique(), probes=())(lambda: None)
    patient = tracer.start_span("patient")
    metered_in(patient, work, calls=3)
    # More live spans than the table holds: the oldest (the patient) is evicted.
    crowd = [tracer.start_span(f"crowd-{index}") for index in range(MANY)]
    for span in crowd:
        metered_in(span, work, calls=2)
    # A call after eviction does not start a fresh, partial count.
    metered_in(patient, work, calls=1)
    patient.end()
    attributes = finished(exporter, "patient")
    assert not any(key.startswith("meterage.") for key in attributes)
    # The newest of the crowd kept their slots and their own totals.
    for span in crowd[-100:]:
        span.end()
    assert {finished(exporter, f"crowd-{MANY - 1 - i}")["meterage.calls"] for i in range(100)} == {
        2
    }
    del crowd, span
    gc.collect()
    assert _native.pending_span_count() == 0


def test_a_reused_address_never_inherits_a_dead_spans_totals(unique, tracing):
    tracer, exporter = tracing
    work = meterage.meter(unique(), probes=())(lambda: None)
    reused = 0
    for batch in range(10):
        # Spans dropped in a batch free a run of blocks that the next spans take again
        # (one at a time, the next span rarely lands on the last one's block on 3.10).
        dropped = [tracer.start_span(f"dropped-{batch}-{index}") for index in range(100)]
        for span in dropped:
            metered_in(span, work, calls=5)
        addresses = {id(span) for span in dropped}
        del dropped, span
        for index in range(100):
            name = f"ended-{batch}-{index}"
            with tracer.start_as_current_span(name) as span:
                reused += id(span) in addresses
                work()
            assert finished(exporter, name)["meterage.calls"] == 1
    # About 5-20 of each 100 land on a dropped span's address (3.10 and 3.11 here): the
    # case above did arise.
    assert reused > 0
    exporter.clear()
    gc.collect()
    assert _native.pending_span_count() == 0


def test_each_threads_spans_count_exactly_their_own_calls(unique, tracing):
    tracer, exporter = tracing
    work = meterage.meter(unique(), probes=())(lambda: None)
    threads_count, spans_per_thread = 8, 50
    start = threading.Barrier(threads_count)
    errors = []

    def run(thread_index):
        try:
            start.wait()
            for index in range(spans_per_thread):
                with tracer.start_as_current_span(f"t{thread_index}-{index}"):
                    for _ in range(thread_index + index % 7 + 1):
                        work()
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for thread_index in range(threads_count):
        for index in range(spans_per_thread):
            calls = finished(exporter, f"t{thread_index}-{index}")["meterage.calls"]
            assert calls == thread_index + index % 7 + 1
    assert _native.pending_span_count() == 0


def test_metered_finalizers_run_by_the_collector_mid_call_are_counted(unique, tracing):
    """Garbage collection (and so finalizers that make metered calls, and the callbacks
    of dying spans) can run inside a metered call's bookkeeping: nothing deadlocks and
    every call lands on the span that was current when it ran."""
    tracer, exporter = tracing
    work = meterage.meter(unique(), probes=())(lambda: None)
    in_span = collections.Counter()

    class Finalized:
        def __init__(self):
            self.cycle = self

        def __del__(self):
            work()
            in_span[getattr(trace.get_current_span(), "name", None)] += 1

    spans = 500
    thresholds = gc.get_threshold()
    faulthandler.dump_traceback_later(120, exit=True)  # a deadlock fails, not hangs
    gc.set_threshold(1, 1, 1)
    try:
        for index in range(spans):
            with tracer.start_as_current_span(f"gc-{index}"):
                Finalized()
                work()
                # A span dropped in a cycle, never ended: collected mid-way too.
                dropped = tracer.start_span("dropped")
                dropped.cycle = dropped
                metered_in(dropped, work)
                del dropped
    finally:
        gc.set_threshold(*thresholds)
        faulthandler.cancel_dump_traceback_later()
    gc.collect()
    for index in range(spans):
        name = f"gc-{index}"
        assert finished(exporter, name)["meterage.calls"] == 1 + in_span[name]
    assert _native.pending_span_count() == 0
