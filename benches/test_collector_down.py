"""The hot path with an unreachable OTLP collector (``--benchmark-only``): metered calls
while a periodic reader keeps failing to export in the background, vs no exporting at all.

Each round is 1000 calls, so the µs columns read as ns per call.
"""

from __future__ import annotations

import logging
import socket

import pytest

pytest.importorskip("opentelemetry.exporter.otlp.proto.http.metric_exporter")

from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

import meterage
import meterage.otel

CALLS = 1000


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def work(x):
    return x


@pytest.mark.benchmark(group="collector down")
@pytest.mark.parametrize("exporting", [False, True], ids=["no-export", "collector-down"])
def test_metered_calls_while_exports_fail(benchmark, exporting):
    metered = meterage.meter(f"bench.collector.{exporting}", probes=())(work)
    provider = None
    if exporting:
        exporter = OTLPMetricExporter(
            endpoint=f"http://127.0.0.1:{closed_port()}/v1/metrics", timeout=0.2
        )
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=100)
        provider = MeterProvider(metric_readers=[reader])
        meterage.otel.attach(provider, process=False)
        # Each failed export is logged by the exporter; keep the benchmark output readable.
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)

    def thousand_calls():
        for index in range(CALLS):
            metered(index)

    try:
        benchmark(thousand_calls)
    finally:
        if provider is not None:
            meterage.otel.detach(provider)
            provider.shutdown(timeout_millis=1000)
