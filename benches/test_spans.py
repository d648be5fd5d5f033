"""Span attributes on the hot path (``--benchmark-only``): a metered call inside an SDK
span with span attributes on, vs the same call with them off. Goal: < 300 ns per call.

Each round is 1000 calls, so the µs columns read as ns per call.
"""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry.sdk.trace import TracerProvider

import meterage
import meterage.otel

CALLS = 1000


def work(x):
    return x


@pytest.mark.benchmark(group="span attributes")
@pytest.mark.parametrize("spans", [False, True], ids=["off", "on"])
@pytest.mark.parametrize("probes", [(), ("cpu",)], ids=["timer-only", "cpu"])
def test_metered_call_inside_a_span(benchmark, spans, probes):
    provider = TracerProvider()
    meterage.otel.span_attributes(provider, enabled=spans)
    metered = meterage.meter(f"bench.spans.{spans}.{len(probes)}", probes=probes, sample=1.0)(work)

    def thousand_calls():
        for index in range(CALLS):
            metered(index)

    try:
        with provider.get_tracer("bench").start_as_current_span("request"):
            benchmark(thousand_calls)
    finally:
        meterage.otel.span_attributes(enabled=False)
        provider.shutdown()
