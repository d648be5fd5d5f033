"""Export correctness: names that would clash with meterage's own metrics, exact explicit
buckets at boundaries, and sums that saturate instead of overflowing.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import meterage
import meterage.otel

_ids = itertools.count()

# The semantic-convention boundaries of http.server.request.duration (s).
DURATION_BOUNDARIES = [
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
]
# The OpenTelemetry SDK's default explicit boundaries.
SDK_BOUNDARIES = [0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0]
SDK_BOUNDARIES += [5000.0, 7500.0, 10000.0]


@pytest.fixture
def exported() -> Iterator[tuple[MeterProvider, InMemoryMetricReader]]:
    """A provider with an in-memory reader (default explicit aggregation), attached."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=False, spans=False, host=False)
    yield provider, reader
    meterage.otel.detach(provider)
    provider.shutdown()
    meterage._native.set_active_tracking(False)


def metrics(reader: InMemoryMetricReader) -> dict[str, Any]:
    """name -> Metric, of one collection."""
    out: dict[str, Any] = {}
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                assert metric.name not in out, f"{metric.name} exported twice"
                out[metric.name] = metric
    return out


# 1. Names of meterage's own metrics are refused for custom instruments.

RESERVED = [
    ("histogram", "meterage.call.duration"),
    ("counter", "meterage.series"),
    ("histogram", "process.cpu.time"),
    ("histogram", "meterage_call_duration_seconds"),
    ("counter", "hw.power"),
    ("counter", "meterage.calls.active"),
    ("histogram", "Meterage.Call.Duration"),
    ("counter", "process_cpu_time_seconds_total"),
    ("histogram", "hw.gpu.utilization"),
    ("histogram", "hw.gpu.memory.usage"),
    ("counter", "hw.energy"),
    ("counter", "system.cpu.time"),
    ("histogram", "container.memory.usage"),
]


@pytest.mark.parametrize(("kind", "name"), RESERVED)
def test_meterages_own_metric_names_are_refused(kind: str, name: str) -> None:
    make = meterage.histogram if kind == "histogram" else meterage.counter
    with pytest.raises(ValueError, match="reserved") as raised:
        make(name)
    assert repr(name) in str(raised.value) or f'"{name}"' in str(raised.value)
    assert not any(s.operation == name for s in meterage.snapshot())


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("histogram", "a.b"), ("histogram", "a_b")),
        (("counter", "a.b"), ("counter", "a_b")),
        (("histogram", "a-b"), ("counter", "a.b")),
        (("histogram", "same"), ("counter", "same")),
        (("counter", "same"), ("histogram", "same")),
    ],
)
def test_two_instruments_with_one_prometheus_name_are_refused(
    unique: Callable[..., str], first: tuple[str, str], second: tuple[str, str]
) -> None:
    prefix = unique().replace(".", "_") + "."
    make = {"histogram": meterage.histogram, "counter": meterage.counter}
    kept = make[first[0]](prefix + first[1])
    with pytest.raises(ValueError, match=re.escape(prefix + first[1])):
        make[second[0]](prefix + second[1])
    # The first stays usable; making it again is fine.
    assert make[first[0]](prefix + first[1]).name == kept.name


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("histogram", "lat", "s"), ("histogram", "lat_seconds", "")),
        (("counter", "reqs", ""), ("counter", "reqs_total", "")),
        (("histogram", "sz", "By"), ("histogram", "sz_bytes", "")),
    ],
)
def test_names_equal_after_prometheus_suffixes_are_refused(
    unique: Callable[..., str], first: tuple[str, str, str], second: tuple[str, str, str]
) -> None:
    prefix = unique().replace(".", "_") + "_"
    make = {"histogram": meterage.histogram, "counter": meterage.counter}
    make[first[0]](prefix + first[1], unit=first[2])
    with pytest.raises(ValueError):
        make[second[0]](prefix + second[1], unit=second[2])


def test_every_exported_name_is_refused() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=True, spans=False, host=True)
    try:
        custom_h = meterage.histogram("export.every.custom.histogram")
        custom_c = meterage.counter("export.every.custom.counter")
        custom_h.record(1.0, attributes={"k": "v"})
        custom_c.add(2)

        @meterage.meter("export.every.op", sample=1.0)
        def work(n: int) -> int:
            return sum(range(n))

        for n in range(20):
            work(n)
        # The operations with semantic-convention aliases (one request in flight).
        with meterage.meter("messaging.process", probes=()):
            pass
        with meterage.meter("http.server.request", probes=()):
            names = set(metrics(reader)) - {custom_h.name, custom_c.name}
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()
        meterage._native.set_active_tracking(False)
    assert {"meterage.call.duration", "meterage.series", "process.cpu.time"} <= names
    assert {"meterage.call.cpu.time.estimated", "http.server.request.duration"} <= names
    assert {"http.server.active_requests", "messaging.process.duration"} <= names
    assert any(name.startswith("system.") for name in names)
    accepted = []
    for name in sorted(names):
        for make in (meterage.histogram, meterage.counter):
            try:
                make(name)
            except ValueError:
                continue
            accepted.append((make.__name__, name))
    assert accepted == []


def test_a_collection_with_valid_custom_instruments_never_fails(
    exported: tuple[MeterProvider, InMemoryMetricReader], unique: Callable[..., str]
) -> None:
    _, reader = exported
    # Near the reserved names, but not theirs.
    names = ["process.queue.depth", "my.meterage.thing", "hw", "llm-tokens", "naïve.größe"]
    names = [f"{name}.{next(_ids)}" for name in names]
    histograms = [meterage.histogram(name, unit="ms", description="d") for name in names]
    counter = meterage.counter(unique("c"), unit="{request}")
    for i, histogram in enumerate(histograms):
        histogram.record(i, attributes={"i": i, "s": "x", "f": 0.5, "b": True})
        histogram.bind({"bound": 1}).record(2 * i)
    counter.add(3, attributes={"route": "/"})
    with meterage.meter(unique("op")) as call:
        call.set_attribute("route", "/")
    for _ in range(2):  # twice: the second collection has earlier state to work from
        found = metrics(reader)
        for name, histogram in zip(names, histograms, strict=True):
            points = found[name].data.data_points
            assert sorted(p.count for p in points) == [1, 1]
            assert sum(p.sum for p in points) == 3 * histograms.index(histogram)
        (point,) = found[counter.name].data.data_points
        assert point.value == 3


# 2. Explicit buckets are exact at their boundaries.


def test_explicit_bucket_export_matches_the_sdk_at_its_boundaries(
    exported: tuple[MeterProvider, InMemoryMetricReader], unique: Callable[..., str]
) -> None:
    provider, reader = exported
    values = [0, 5, 50, 100, 1000, 2500, 5000, 4.9, 5.1, 999, 1001, 10, 25, 75, 250, 500, 750]
    values += [7500, 10000, 10000.5, 0.001, 1e9]
    ours = meterage.histogram(unique("ours"))
    theirs = provider.get_meter("x").create_histogram(unique("sdk"))
    for value in values:
        ours.record(value)
        theirs.record(value)
    found = metrics(reader)
    (mine,) = found[ours.name].data.data_points
    (sdk,) = found[theirs.name].data.data_points
    assert list(mine.explicit_bounds) == list(sdk.explicit_bounds) == SDK_BOUNDARIES
    assert list(mine.bucket_counts) == list(sdk.bucket_counts)
    assert (mine.count, mine.sum, mine.min, mine.max) == (sdk.count, sdk.sum, sdk.min, sdk.max)


def test_explicit_bucket_counts_are_exact_at_the_duration_boundaries(
    unique: Callable[..., str],
) -> None:
    histogram = meterage.histogram(unique())
    values = [0.005, 0.075, 2.5]
    for boundary in DURATION_BOUNDARIES:
        values += [boundary, math.nextafter(boundary, 0), math.nextafter(boundary, math.inf)]
    for value in values:
        histogram.record(value)
    expected = [0] * (len(DURATION_BOUNDARIES) + 1)
    for value in values:
        expected[bisect.bisect_left(DURATION_BOUNDARIES, value)] += 1
    counts = histogram.snapshot().explicit_bucket_counts(DURATION_BOUNDARIES)
    assert counts == expected
    # meterage's own duration boundaries are these.
    assert list(meterage._native.DURATION_MEASURE["boundaries"]) == DURATION_BOUNDARIES


# Every measure of every probe, as declared: a new probe's boundaries are checked too.
MEASURE_BOUNDARIES = {
    measure["key"]: measure["boundaries"]
    for probe in meterage._native.PROBES
    for measure in probe["measures"]
}


@pytest.mark.parametrize("measure", sorted(MEASURE_BOUNDARIES))
def test_explicit_bucket_counts_are_exact_at_every_measures_boundaries(
    unique: Callable[..., str], measure: str
) -> None:
    boundaries = list(MEASURE_BOUNDARIES[measure])
    histogram = meterage.histogram(unique())
    values = []
    for boundary in boundaries:
        values += [boundary, math.nextafter(boundary, math.inf)]
        if boundary > 0:
            values.append(math.nextafter(boundary, 0))
    for value in values:
        histogram.record(value)
    expected = [0] * (len(boundaries) + 1)
    for value in values:
        expected[bisect.bisect_left(boundaries, value)] += 1
    assert histogram.snapshot().explicit_bucket_counts(boundaries) == expected


# 3. Sums saturate.


def test_sums_saturate_and_export(
    exported: tuple[MeterProvider, InMemoryMetricReader], unique: Callable[..., str]
) -> None:
    _, reader = exported
    histogram = meterage.histogram(unique("h"))
    counter = meterage.counter(unique("c"))
    for _ in range(2):
        histogram.record(1.7e308)
        counter.add(1.7e308)
    snapshot = histogram.snapshot()
    assert (snapshot.count, snapshot.sum, snapshot.max) == (2, sys.float_info.max, 1.7e308)
    assert counter.value() == sys.float_info.max
    found = metrics(reader)
    (point,) = found[histogram.name].data.data_points
    assert (point.count, point.sum) == (2, sys.float_info.max)
    assert sum(point.bucket_counts) == 2
    (total,) = found[counter.name].data.data_points
    assert total.value == sys.float_info.max and math.isfinite(total.value)
