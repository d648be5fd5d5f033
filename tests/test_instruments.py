"""Custom instruments (histogram, counter), snapshot objects, and the cardinality limit."""

from __future__ import annotations

import math

import pytest

import meterage
from meterage import _native

BASE = 2 ** (2**-4)  # bucket base at scale 4


# ---- histograms -----------------------------------------------------------------------------


def test_histogram_record_and_snapshot(unique):
    name = unique("llm.tokens")
    tokens = meterage.histogram(name, unit="{token}", description="Tokens per request")
    assert isinstance(tokens, meterage.Histogram)
    assert (tokens.name, tokens.unit, tokens.description) == (name, "{token}", "Tokens per request")
    assert repr(tokens) == f'<meterage.histogram "{name}" unit="{{token}}">'
    for value in (512, 3, 0.5, 100.25):
        tokens.record(value)
    snapshot = tokens.snapshot()
    assert isinstance(snapshot, meterage.HistogramSnapshot)
    assert (snapshot.count, snapshot.sum, snapshot.min, snapshot.max) == (4, 615.75, 0.5, 512)
    assert snapshot.mean == 615.75 / 4
    assert snapshot.unit == "{token}"
    assert snapshot.estimated_sum == 615.75
    assert snapshot.quantile(0) == 0.5
    assert snapshot.quantile(1) == 512
    assert (
        repr(snapshot) == 'HistogramSnapshot(count=4, sum=615.75, min=0.5, max=512, unit="{token}")'
    )


def test_histogram_attributes_make_separate_series(unique, series_of):
    name = unique()
    histogram = meterage.histogram(name)
    histogram.record(512, attributes={"model": "small"})
    histogram.record(256, attributes={"model": "small"})
    histogram.record(4096, attributes={"model": "large", "cached": False})
    histogram.record(1)
    small = histogram.snapshot({"model": "small"})
    assert (small.count, small.sum) == (2, 768)
    assert histogram.snapshot({"cached": False, "model": "large"}).sum == 4096  # any key order
    assert histogram.snapshot().sum == 1
    assert histogram.snapshot(None).sum == 1
    missing = histogram.snapshot({"model": "medium"})
    assert (missing.count, missing.sum, missing.min, missing.max) == (0, 0, 0, 0)
    assert math.isnan(missing.quantile(0.5))
    assert math.isnan(missing.mean)
    by_attributes = {tuple(sorted(s.attributes.items())): s for s in series_of(name)}
    assert set(by_attributes) == {
        (),
        (("model", "small"),),
        (("cached", False), ("model", "large")),
    }
    series = by_attributes[(("model", "small"),)]
    assert series.kind == "histogram"
    assert series.operation == series.name == name
    assert series.count == 2
    # A custom histogram's one measure is named after the instrument.
    assert list(series.histograms) == [name]
    assert series.histograms[name].sum == 768
    assert series.sampled == 2


def test_attribute_value_types_are_distinct(unique):
    histogram = meterage.histogram(unique())
    histogram.record(1, attributes={"v": 1})
    histogram.record(2, attributes={"v": 1.0})
    histogram.record(4, attributes={"v": True})
    histogram.record(8, attributes={"v": "1"})
    assert [histogram.snapshot({"v": v}).sum for v in (1, 1.0, True, "1")] == [1, 2, 4, 8]


def test_same_name_is_the_same_instrument(unique, series_of):
    name = unique()
    first = meterage.histogram(name, unit="ms")
    second = meterage.histogram(name, unit="s")
    first.record(1)
    second.record(2)
    assert first.snapshot().count == second.snapshot().count == 2
    # The first registration keeps its unit.
    assert second.unit == "ms"
    (series,) = series_of(name)
    assert series.unit == "ms"


def test_histogram_and_counter_names_do_not_collide(unique):
    name = unique()
    meterage.histogram(name)
    with pytest.raises(ValueError, match="already a histogram"):
        meterage.counter(name)
    other = unique()
    meterage.counter(other)
    with pytest.raises(ValueError, match="already a counter"):
        meterage.histogram(other)


def test_zero_values_go_to_the_zero_bucket(unique):
    histogram = meterage.histogram(unique())
    for value in (0, 0.0, 5):
        histogram.record(value)
    snapshot = histogram.snapshot()
    assert snapshot.zero_count == 2
    assert snapshot.count == 3
    assert (snapshot.min, snapshot.max, snapshot.sum) == (0, 5, 5)
    assert snapshot.quantile(0.5) == 0
    assert sum(snapshot.bucket_counts) == 1


def test_exponential_buckets_follow_the_otel_layout(unique):
    histogram = meterage.histogram(unique())
    histogram.record(1.0)
    snapshot = histogram.snapshot()
    # Scale 4: base 2^(1/16); bucket i holds (base^i, base^(i+1)], so 1.0 is in bucket -1.
    assert snapshot.scale == 4
    assert snapshot.offset == -1
    assert snapshot.bucket_counts == [1]
    ((lower, upper, count),) = snapshot.buckets()
    assert count == 1
    assert lower == pytest.approx(BASE**-1, rel=1e-12)
    assert upper == pytest.approx(1.0, rel=1e-12)

    values = [0.001, 0.0015, 1.0, 2.0, 3.0, 1e6]
    for value in values[1:]:
        histogram.record(value)
    histogram.record(values[0])
    snapshot = histogram.snapshot()
    buckets = snapshot.buckets()
    assert len(buckets) == len(snapshot.bucket_counts)
    assert [c for _, _, c in buckets] == snapshot.bucket_counts
    assert sum(snapshot.bucket_counts) == snapshot.count == 7
    for position, (lower, upper, _) in enumerate(buckets):
        index = snapshot.offset + position
        assert lower == pytest.approx(BASE**index, rel=1e-12)
        assert upper == pytest.approx(BASE ** (index + 1), rel=1e-12)
    for value in values:
        # Each value lies in a bucket with a count, and that bucket is the one formula gives.
        index = math.ceil(math.log2(value) * 16) - 1
        position = index - snapshot.offset
        assert snapshot.bucket_counts[position] >= 1, value
        lower, upper, _ = buckets[position]
        assert lower < value <= upper * (1 + 1e-12), value
    # 2.0 is exactly a boundary: upper-inclusive, so it is in bucket 15, not 16.
    assert snapshot.bucket_counts[15 - snapshot.offset] == 1


def test_snapshot_is_a_copy(unique):
    histogram = meterage.histogram(unique())
    histogram.record(3)
    before = histogram.snapshot()
    histogram.record(5)
    assert before.count == 1
    assert histogram.snapshot().count == 2


def test_quantile_argument_range(unique):
    histogram = meterage.histogram(unique())
    histogram.record(1)
    for q in (-0.01, 1.01, math.nan, math.inf):
        with pytest.raises(ValueError, match="q must be in"):
            histogram.snapshot().quantile(q)


# ---- counters ---------------------------------------------------------------------------------


def test_counter_add_and_value(unique, series_of):
    name = unique("cache.misses")
    misses = meterage.counter(name, unit="{miss}", description="Cache misses")
    assert isinstance(misses, meterage.Counter)
    assert (misses.name, misses.unit, misses.description) == (name, "{miss}", "Cache misses")
    assert repr(misses) == f'<meterage.counter "{name}" unit="{{miss}}">'
    assert misses.value() == 0.0
    misses.add(1)
    misses.add()  # default 1
    misses.add(2.5)
    misses.add(4, attributes={"cache": "l2"})
    assert misses.value() == 4.5
    assert misses.value({"cache": "l2"}) == 4
    assert misses.value({"cache": "l3"}) == 0
    by_attributes = {tuple(sorted(s.attributes.items())): s for s in series_of(name)}
    assert set(by_attributes) == {(), (("cache", "l2"),)}
    default = by_attributes[()]
    assert default.kind == "counter"
    assert default.value == 4.5
    assert default.count == 3  # adds
    assert default.unit == "{miss}"
    assert default.description == "Cache misses"
    assert default.histograms == {}


def test_counter_add_zero_creates_the_series(unique, one_series):
    name = unique()
    counter = meterage.counter(name)
    counter.add(0, attributes={"k": 1})
    series = one_series(name)
    assert (series.attributes, series.value, series.count) == ({"k": 1}, 0.0, 1)


def test_snapshot_orders_calls_then_histograms_then_counters(unique):
    counter_name, histogram_name, call_name = unique("c"), unique("h"), unique("m")
    meterage.counter(counter_name).add(1)
    meterage.histogram(histogram_name).record(1)
    meterage.meter(call_name)(lambda: None)()
    kinds = [s.kind for s in meterage.snapshot()]
    assert kinds == ["call", "histogram", "counter"]


def test_series_attributes_and_histograms_are_copies(unique, one_series):
    name = unique()
    meterage.histogram(name).record(1, attributes={"a": "b"})
    series = one_series(name)
    series.attributes["a"] = "changed"
    series.histograms.clear()
    assert series.attributes == {"a": "b"}
    assert name in series.histograms


# ---- cardinality ---------------------------------------------------------------------------------

OVERFLOW = {"otel.metric.overflow": True}


def test_configure_returns_the_settings():
    settings = meterage.configure()
    assert settings == {"budget": 0.01, "cardinality_limit": 2000}
    assert meterage.configure(cardinality_limit=7)["cardinality_limit"] == 7
    assert meterage.configure(budget=0.5) == {"budget": 0.5, "cardinality_limit": 7}
    assert meterage.configure() == {"budget": 0.5, "cardinality_limit": 7}


def test_cardinality_limit_sends_new_attribute_sets_to_one_overflow_series(unique, series_of):
    limit = 5
    meterage.configure(cardinality_limit=limit)
    name = unique()
    m = meterage.meter(name)
    for key in range(40):
        with m as call:
            call.set_attribute("key", key)
    series = series_of(name)
    regular = [s for s in series if s.attributes != OVERFLOW]
    overflow = [s for s in series if s.attributes == OVERFLOW]
    # At most `limit` series of their own (the meter's own attribute-less series, created
    # when it was, may hold one of the slots), then one overflow series for all the rest.
    assert limit - 1 <= len(regular) <= limit
    assert len(overflow) == 1
    assert all(s.count == 1 for s in regular)
    assert sorted(s.attributes["key"] for s in regular) == list(range(len(regular)))
    assert overflow[0].count == 40 - len(regular)
    assert type(overflow[0].attributes["otel.metric.overflow"]) is bool
    # Nothing is lost: every call is in some series.
    assert sum(s.count for s in series) == 40
    # A set that got its own series before the limit keeps it.
    with m as call:
        call.set_attribute("key", 0)
    assert [s.count for s in series_of(name, {"key": 0})] == [2]


def test_cardinality_limit_applies_to_decorated_failures(unique, series_of):
    meterage.configure(cardinality_limit=3)
    name = unique()

    errors = [type(f"Error{i}", (Exception,), {}) for i in range(10)]

    @meterage.meter(name)
    def fail(i):
        raise errors[i]()

    for i in range(10):
        with pytest.raises(errors[i]):
            fail(i)
    series = series_of(name)
    assert sum(s.count for s in series) == 10
    assert len(series) <= 3 + 1
    assert [s.attributes for s in series if s.attributes == OVERFLOW] == [OVERFLOW]


def test_cardinality_limit_on_instruments_and_bounded_memory(unique, series_of):
    limit = 50
    meterage.configure(cardinality_limit=limit)
    name = unique()
    histogram = meterage.histogram(name)
    for key in range(2 * limit):
        histogram.record(1.0, attributes={"key": key})
    memory_after_overflow = _native.memory_bytes()
    for key in range(2 * limit, 100 * limit):
        histogram.record(1.0, attributes={"key": key})
    # Thousands more attribute sets past the limit allocate nothing more.
    assert _native.memory_bytes() == memory_after_overflow
    series = series_of(name)
    assert len(series) <= limit + 1
    (overflow,) = [s for s in series if s.attributes == OVERFLOW]
    assert sum(s.count for s in series) == 100 * limit
    assert overflow.count >= 100 * limit - limit
    assert histogram.snapshot(OVERFLOW).count == overflow.count


def test_memory_grows_per_series_until_the_limit(unique):
    meterage.configure(cardinality_limit=20)
    counter_name = unique()
    histogram = meterage.histogram(counter_name)
    start = _native.memory_bytes()
    for key in range(10):
        histogram.record(1.0, attributes={"key": key})
    per_series = (_native.memory_bytes() - start) / 10
    assert per_series > 0
    for key in range(10, 5000):
        histogram.record(1.0, attributes={"key": key})
    # At most 20 series and one overflow series were ever allocated.
    assert _native.memory_bytes() - start <= 21 * per_series


def test_counter_cardinality_limit(unique, series_of):
    meterage.configure(cardinality_limit=4)
    name = unique()
    counter = meterage.counter(name)
    for key in range(20):
        counter.add(1, attributes={"key": key})
    series = series_of(name)
    assert sum(s.value for s in series) == 20
    assert len(series) <= 4 + 1
    assert counter.value(OVERFLOW) >= 20 - 4
