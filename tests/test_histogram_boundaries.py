"""Custom histograms' own explicit bucket boundaries (``meterage.histogram(boundaries=...)``,
OpenTelemetry's advisory boundaries), through real OpenTelemetry readers: exported as
asked, exact for meterage's sets, overridden by a reader's own, in both temporalities.

Instruments live for the whole process, so each test names its own (``unique``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import (
    ExplicitBucketHistogramAggregation,
    ExponentialBucketHistogramAggregation,
)

import meterage
import meterage.jobs
import meterage.otel
from meterage import _http

KIB = 1024.0


@pytest.fixture
def attached() -> Iterator[Callable[..., tuple[MeterProvider, InMemoryMetricReader]]]:
    """``attached(**reader_options)`` -> (provider, in-memory reader), meterage attached:
    conftest's ``reader_of`` with the provider too (the SDK's own instruments are made on it)."""
    made: list[MeterProvider] = []

    def make(**options: Any) -> tuple[MeterProvider, InMemoryMetricReader]:
        reader = InMemoryMetricReader(**options)
        provider = MeterProvider(metric_readers=[reader])
        meterage.otel.attach(provider, process=False, spans=False, host=False)
        made.append(provider)
        return provider, reader

    yield make
    for provider in made:
        meterage.otel.detach(provider)
        provider.shutdown()
    meterage._native.set_active_tracking(False)


def points_of(reader: InMemoryMetricReader, name: str) -> list[Any]:
    """The points of metric ``name`` in one collection (none if it is not there)."""
    data = reader.get_metrics_data()
    found: list[Any] = []
    for resource_metrics in data.resource_metrics if data is not None else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name == name:
                    found.extend(metric.data.data_points)
    return found


def expected_counts(boundaries: tuple[float, ...], values: list[float]) -> list[int]:
    """Counts per explicit bucket as OpenTelemetry defines them: (b[i-1], b[i]]."""
    counts = [0] * (len(boundaries) + 1)
    for value in values:
        counts[bisect.bisect_left(boundaries, value)] += 1
    return counts


def around(boundaries: tuple[float, ...]) -> list[float]:
    """Values on each boundary, one float step either side, and (for integers, such as
    byte sizes) one unit either side."""
    values = [0.0]
    for bound in boundaries:
        values += [bound, math.nextafter(bound, 0.0), math.nextafter(bound, math.inf)]
        if bound >= 1 and bound == int(bound):
            values += [bound - 1, bound + 1]
    return [value for value in values if value >= 0]


# --- the argument -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("boundaries", "error", "words"),
    [
        ("0.1,1", TypeError, "boundaries must be a sequence of numbers"),
        (b"\x01", TypeError, "not bytes"),
        ({0.1: 1}, TypeError, "not dict"),
        ({0.1, 1.0}, TypeError, "not set"),
        (1.0, TypeError, "not float"),
        ((x for x in (1.0,)), TypeError, "not generator"),
        ([0.1, "1"], TypeError, "boundaries[1] must be an int or float, not str"),
        ([True], TypeError, "boundaries[0] must be an int or float, not bool"),
        ([0.1, None], TypeError, "boundaries[1] must be an int or float, not NoneType"),
        ([], ValueError, "got no values"),
        (list(range(65)), ValueError, "got more than 64"),
        ([1.0, math.nan], ValueError, "boundaries[1] is NaN"),
        ([math.inf], ValueError, "boundaries[0] is inf"),
        ([10**400], ValueError, "boundaries[0] is an int too large for a float"),
        ([-1.0, 1.0], ValueError, "boundaries[0] is -1.0 (histogram values are never negative)"),
        ([1, 1], ValueError, "boundaries[1] (1.0) does not exceed boundaries[0] (1.0)"),
        ([0.5, 0.25], ValueError, "boundaries[1] (0.25) does not exceed boundaries[0] (0.5)"),
    ],
)
def test_bad_boundaries_are_refused_naming_the_argument_and_what_is_allowed(
    unique, boundaries, error, words
) -> None:
    name = unique()
    with pytest.raises(error) as raised:
        meterage.histogram(name, boundaries=boundaries)
    message = str(raised.value)
    assert words in message and "boundaries" in message
    if error is ValueError and "int too large" not in message:
        assert "1 to 64 finite, non-negative numbers in strictly increasing order" in message
    # Nothing was made: the name is still free, for any boundaries.
    assert meterage.histogram(name, boundaries=[1.0]).boundaries == (1.0,)


def test_what_is_accepted(unique) -> None:
    assert meterage.histogram(unique()).boundaries is None
    assert meterage.histogram(unique(), boundaries=None).boundaries is None
    assert meterage.histogram(unique(), boundaries=[0, 1, 2.5]).boundaries == (0.0, 1.0, 2.5)
    assert meterage.histogram(unique(), boundaries=range(1, 4)).boundaries == (1.0, 2.0, 3.0)
    assert meterage.histogram(unique(), boundaries=(-0.0, 1)).boundaries == (0.0, 1.0)
    assert len(meterage.histogram(unique(), boundaries=range(64)).boundaries or ()) == 64


def test_the_first_call_for_a_name_fixes_its_boundaries(unique) -> None:
    name = unique()
    first = meterage.histogram(name, unit="By", boundaries=meterage.BOUNDARIES["bytes"])
    # Later calls get the same instrument, whatever boundaries they give (as for the unit).
    again = meterage.histogram(name, unit="s", boundaries=[1.0, 2.0])
    plain = meterage.histogram(name)
    assert first.boundaries == again.boundaries == plain.boundaries
    assert again.unit == "By"
    assert again.boundaries == meterage.BOUNDARIES["bytes"]
    # A later call's boundaries are still checked.
    with pytest.raises(ValueError, match="boundaries"):
        meterage.histogram(name, boundaries=[2.0, 1.0])
    # Without boundaries first, the default ones stay.
    other = unique()
    meterage.histogram(other)
    assert meterage.histogram(other, boundaries=[1.0]).boundaries is None


def test_the_named_sets() -> None:
    sets = meterage.BOUNDARIES
    assert set(sets) == {
        "duration",
        "cpu.time",
        "queue.wait",
        "bytes",
        "events",
        "allocations",
        "energy",
        "gpu.memory",
        "default",
    }
    with pytest.raises(TypeError):
        sets["bytes"] = (1.0,)  # type: ignore[index]
    from meterage import _tables

    assert set(_tables.BOUNDARY_SETS) == set(sets), "the docs' table of sets needs each"
    from meterage.otel._names import (
        BYTE_BOUNDARIES,
        CALL_METRICS,
        DEFAULT_BOUNDARIES,
        DURATION_BOUNDARIES,
    )

    assert sets["duration"] == DURATION_BOUNDARIES
    assert sets["bytes"] == BYTE_BOUNDARIES == (0.0, *(KIB * 4**k for k in range(11)))
    assert sets["default"] == DEFAULT_BOUNDARIES
    assert sets["queue.wait"] == (0.001, *DURATION_BOUNDARIES, 20.0, 60.0, 300.0, 1200.0, 3600.0)
    # Every measure's boundaries are one of the sets.
    assert {metric.boundaries for metric in CALL_METRICS.values()} <= set(sets.values())


def test_meterages_own_custom_histograms_have_their_sets() -> None:
    meters = _http.RequestMeters(probes=(), sample=None, budget=None)
    assert meters.request_size.boundaries == meterage.BOUNDARIES["bytes"]
    assert meters.response_size.boundaries == meterage.BOUNDARIES["bytes"]
    assert meterage.jobs.queue_wait().boundaries == meterage.BOUNDARIES["queue.wait"]
    assert meterage.jobs.output_size().boundaries == meterage.BOUNDARIES["bytes"]


# --- the export -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(meterage.BOUNDARIES))
def test_each_set_is_exported_exactly_as_the_sdks_advisory_boundaries_are(
    unique, attached, name
) -> None:
    provider, reader = attached()
    boundaries = meterage.BOUNDARIES[name]
    ours = meterage.histogram(unique("ours"), boundaries=boundaries)
    theirs = provider.get_meter("test").create_histogram(
        unique("sdk"), explicit_bucket_boundaries_advisory=boundaries
    )
    values = [*around(boundaries), 1e15]
    for value in values:
        ours.record(value)
        theirs.record(value)
    (mine,) = points_of(reader, ours.name)
    (sdk,) = points_of(reader, theirs.name)
    assert tuple(mine.explicit_bounds) == tuple(sdk.explicit_bounds) == boundaries
    assert list(mine.bucket_counts) == expected_counts(boundaries, values)
    assert list(mine.bucket_counts) == list(sdk.bucket_counts)
    assert (mine.count, mine.min, mine.max) == (sdk.count, sdk.min, sdk.max)
    assert mine.sum == pytest.approx(sdk.sum, rel=1e-12)


def test_boundaries_made_of_the_sets_values_are_exact_and_others_within_a_bucket(
    unique, attached
) -> None:
    _, reader = attached()
    # Values of the sets (and powers of two) in a set of one's own: exact.
    mixed = (0.0, 0.001, 0.5, 20.0, 3600.0, KIB * 64)
    histogram = meterage.histogram(unique("mixed"), boundaries=mixed)
    values = around(mixed)
    for value in values:
        histogram.record(value)
    (point,) = points_of(reader, histogram.name)
    assert list(point.bucket_counts) == expected_counts(mixed, values)
    # Any other boundary: a value more than one exponential bucket (4.4%) away from it is
    # counted on its side; one closer may be counted on the other.
    odd = (3.3,)
    histogram = meterage.histogram(unique("odd"), boundaries=odd)
    far = [3.3 / 1.05, 3.3 * 1.05, 1.0, 10.0]
    near = [3.3, math.nextafter(3.3, 0), math.nextafter(3.3, 9)]
    for value in far + near:
        histogram.record(value)
    (point,) = points_of(reader, histogram.name)
    low, high = point.bucket_counts
    assert low + high == len(far) + len(near)
    assert 2 <= low <= 2 + len(near) and 2 <= high <= 2 + len(near)


def test_a_readers_own_boundaries_win_and_its_default_aggregation_takes_the_advisory(
    unique, attached
) -> None:
    _, override = attached(
        preferred_aggregation={Histogram: ExplicitBucketHistogramAggregation([10, 100])}
    )
    _, advisory = attached(preferred_aggregation={Histogram: ExplicitBucketHistogramAggregation()})
    _, exponential = attached(
        preferred_aggregation={Histogram: ExponentialBucketHistogramAggregation()}
    )
    sizes = meterage.histogram(unique(), unit="By", boundaries=(0.0, KIB, 4 * KIB))
    for value in (1, 50, 50, 500, 1024, 5000):
        sizes.record(value)
    (point,) = points_of(override, sizes.name)
    assert (tuple(point.explicit_bounds), list(point.bucket_counts)) == ((10.0, 100.0), [1, 2, 3])
    (point,) = points_of(advisory, sizes.name)
    assert tuple(point.explicit_bounds) == (0.0, KIB, 4 * KIB)
    assert list(point.bucket_counts) == [0, 5, 0, 1]
    (point,) = points_of(exponential, sizes.name)
    assert point.count == 6 and point.scale <= 4  # no explicit bounds at all


def test_delta_points_are_exact_on_the_boundaries(unique, attached) -> None:
    _, delta = attached(preferred_temporality={Histogram: AggregationTemporality.DELTA})
    _, cumulative = attached()
    waits = meterage.BOUNDARIES["queue.wait"]
    histogram = meterage.histogram(unique(), unit="s", boundaries=waits)
    first = [0.005, 0.0051, 60.0, 60.000001, 3600.0]
    for value in first:
        histogram.record(value)
    (point,) = points_of(delta, histogram.name)
    assert list(point.bucket_counts) == expected_counts(waits, first)
    points_of(cumulative, histogram.name)
    second = [0.005, 0.005, math.nextafter(0.005, 1), 59.999, 60.0, 1200.0, 1e6]
    for value in second:
        histogram.record(value)
    (point,) = points_of(delta, histogram.name)
    assert point.count == len(second)
    assert tuple(point.explicit_bounds) == waits
    assert list(point.bucket_counts) == expected_counts(waits, second)
    (point,) = points_of(cumulative, histogram.name)
    assert list(point.bucket_counts) == expected_counts(waits, first + second)
    # Nothing new: no delta point.
    assert points_of(delta, histogram.name) == []


def test_the_prometheus_exposition_has_the_boundaries_as_le_buckets(unique) -> None:
    prometheus_exporter = pytest.importorskip("opentelemetry.exporter.prometheus")
    from prometheus_client import REGISTRY, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    reader = prometheus_exporter.PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=False, spans=False, host=False)
    try:
        name = unique("body").replace(".", "_")
        sizes = meterage.histogram(name, unit="By", boundaries=meterage.BOUNDARIES["bytes"])
        for value in (0, 1023, 1024, 1025, 4096, 2**30, 2**30 + 1):
            sizes.record(value, attributes={"route": "/upload"})
        page = generate_latest(REGISTRY).decode()
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()
    buckets = {
        float(sample.labels["le"]): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == f"{name}_bytes_bucket"
    }
    assert len(buckets) == len(meterage.BOUNDARIES["bytes"]) + 1, page[:3000]
    # Cumulative "at or below" counts.
    assert buckets[0.0] == 1
    assert buckets[KIB] == 3
    assert buckets[4 * KIB] == 5
    assert buckets[2.0**30] == 6
    assert buckets[math.inf] == 7


def test_a_jobs_wait_and_output_reach_a_reader_in_their_sets(unique, attached) -> None:
    import time

    _, reader = attached()
    name = unique("job")
    for waited, output in ((90.0, 4096), (0.015, 1), (7200.0, 3 * 2**20)):
        job = meterage.jobs.start(
            name, queue="q", system="threads", enqueued_at=time.time() - waited
        )
        job.run(meterage.jobs.report_output, output)
        job.end()
    (point,) = [
        p for p in points_of(reader, meterage.jobs.QUEUE_WAIT) if name in p.attributes.values()
    ]
    waits = meterage.BOUNDARIES["queue.wait"]
    assert tuple(point.explicit_bounds) == waits
    counts = list(point.bucket_counts)
    # 15 ms in (10 ms, 25 ms]; 90 s in (60 s, 300 s]; two hours above the last boundary.
    assert counts[waits.index(0.025)] == 1 and counts[waits.index(300.0)] == 1
    assert counts[-1] == 1 and sum(counts) == 3
    (point,) = [
        p for p in points_of(reader, meterage.jobs.OUTPUT_SIZE) if name in p.attributes.values()
    ]
    sizes = meterage.BOUNDARIES["bytes"]
    assert tuple(point.explicit_bounds) == sizes
    assert list(point.bucket_counts) == expected_counts(sizes, [4096, 1, 3 * 2**20])
