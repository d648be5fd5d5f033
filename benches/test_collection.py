"""Collection cost: 1,000 series into OpenTelemetry data (``--benchmark-only``).

The goal is ≤ 20 ms for 1,000 series, independent of how many calls were recorded:
histograms are aggregated on the hot path, so collection walks series, not calls.
"""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import meterage
import meterage.otel

SERIES = 1000


def fill(probes: tuple[str, ...], calls_per_series: int) -> None:
    """SERIES series of one operation (one per route attribute)."""
    meterage.reset()
    meterage.configure(cardinality_limit=SERIES + 10)
    meter = meterage.meter(f"bench.collect.{len(probes)}", probes=probes, sample=1.0)
    for route in range(SERIES):
        for _ in range(calls_per_series):
            with meter as call:
                call.set_attribute("route", f"/r/{route}")


@pytest.mark.benchmark(group="collection")
@pytest.mark.parametrize("calls_per_series", [1, 20])
@pytest.mark.parametrize("probes", [(), ("cpu", "rusage", "io")], ids=["timer-only", "all-probes"])
def test_collect_1000_series(benchmark, probes, calls_per_series):
    fill(probes, calls_per_series)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=False)
    try:
        data = benchmark(reader.get_metrics_data)
        (duration,) = [
            metric
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == "meterage.call.duration"
        ]
        assert len(duration.data.data_points) == SERIES
        assert sum(p.count for p in duration.data.data_points) == SERIES * calls_per_series
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()
        meterage.configure(cardinality_limit=2000)
