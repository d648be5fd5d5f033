"""Histogram accuracy, property-based: every quantile within 2.5% of the exact nearest-rank
quantile; count, sum, min and max exact."""

from __future__ import annotations

import itertools
import math

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import meterage

RELATIVE_ERROR = 0.025  # the histogram promises (b-1)/(b+1) ~ 2.17% at base 2^(1/16)
FIXED_QUANTILES = [0.0, 1e-6, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0]

_names = itertools.count()

log_uniform = st.floats(min_value=math.log(1e-9), max_value=math.log(3600.0)).map(
    lambda x: min(max(math.exp(x), 1e-9), 3600.0)
)
quantile = st.floats(min_value=0.0, max_value=1.0)

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def exact_quantile(ordered: list[float], q: float) -> float:
    """Nearest rank: the value at rank max(1, ceil(q n)); q = 0 -> min, q = 1 -> max."""
    n = len(ordered)
    rank = min(n, max(1, math.ceil(q * n)))
    return ordered[rank - 1]


def sequential_sum(values: list[float]) -> float:
    # Plain left-to-right addition (what the histogram does), not math.fsum or 3.12's sum().
    total = 0.0
    for value in values:
        total += value
    return total


def recorded(values: list[float]) -> meterage.HistogramSnapshot:
    histogram = meterage.histogram(f"test.quantiles.{next(_names)}")
    for value in values:
        histogram.record(value)
    return histogram.snapshot()


def check(values: list[float], quantiles: list[float]) -> None:
    snapshot = recorded(values)
    ordered = sorted(values)
    assert snapshot.count == len(values)
    assert snapshot.sum == sequential_sum(values)
    assert snapshot.min == ordered[0]
    assert snapshot.max == ordered[-1]
    assert snapshot.zero_count + sum(snapshot.bucket_counts) == len(values)
    assert snapshot.quantile(0) == ordered[0]
    assert snapshot.quantile(1) == ordered[-1]
    for q in quantiles:
        exact = exact_quantile(ordered, q)
        estimate = snapshot.quantile(q)
        if exact == 0:
            assert estimate == 0, (q, estimate)
        else:
            assert abs(estimate - exact) <= RELATIVE_ERROR * exact, (q, estimate, exact)
        # Estimates never leave the recorded range.
        assert ordered[0] <= estimate <= ordered[-1]


@SETTINGS
@given(
    values=st.lists(log_uniform, min_size=1, max_size=400),
    extra=st.lists(quantile, max_size=10),
)
@example(values=[1e-9], extra=[0.5])
@example(values=[3600.0, 1e-9], extra=[0.5, 0.500001])
@example(values=[1.0, 2.0, 4.0, 8.0], extra=[0.25, 0.26, 0.5, 0.75])
def test_quantiles_of_log_uniform_values(values, extra):
    check(values, FIXED_QUANTILES + extra)


@SETTINGS
@given(
    values=st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=300),
    extra=st.lists(quantile, max_size=5),
)
@example(values=[0, 0, 0, 7], extra=[0.75, 0.76])
def test_quantiles_of_integer_counts_with_zeros(values, extra):
    check([float(v) for v in values], FIXED_QUANTILES + extra)


@SETTINGS
@given(
    value=log_uniform,
    repeat=st.integers(min_value=1, max_value=50),
)
def test_a_repeated_value(value, repeat):
    snapshot = recorded([value] * repeat)
    # Every quantile of a constant is the constant (clamped to [min, max]).
    for q in FIXED_QUANTILES:
        assert snapshot.quantile(q) == value
    assert snapshot.count == repeat
    assert (snapshot.min, snapshot.max) == (value, value)


@SETTINGS
@given(
    values=st.lists(log_uniform, min_size=1, max_size=200),
)
def test_buckets_contain_their_values(values):
    snapshot = recorded(values)
    buckets = snapshot.buckets()
    assert sum(count for _, _, count in buckets) == len(values)
    for value in values:
        # The bucket of each value has a count. Bounds are rounded powers of 2^(1/16) while
        # the bucketing is exact, so a value within an ulp of a bound is matched with a
        # relative slack of 1e-12 (it may then match both neighbours; one must count it).
        counts = [
            count
            for lower, upper, count in buckets
            if lower * (1 - 1e-12) < value <= upper * (1 + 1e-12)
        ]
        assert 1 <= len(counts) <= 2 and any(counts), value


def test_quantile_against_nearest_rank_on_a_known_list():
    values = [float(v) for v in range(1, 101)]  # 1..100
    snapshot = recorded(values)
    for q, expected in [(0.5, 50), (0.9, 90), (0.99, 99), (0.001, 1), (0.995, 100)]:
        assert abs(snapshot.quantile(q) - expected) <= RELATIVE_ERROR * expected


def test_duration_quantiles_follow_the_same_histogram(unique, one_series):
    name = unique()
    f = meterage.meter(name, probes=())(lambda: None)
    for _ in range(100):
        f()
    duration = one_series(name).histograms["duration"]
    assert duration.quantile(0) == duration.min
    assert duration.quantile(1) == duration.max
    assert duration.min <= duration.quantile(0.5) <= duration.quantile(0.99) <= duration.max
