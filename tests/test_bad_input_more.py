"""Bad input: a clear exception that names the argument and what is allowed, and nothing
recorded. Snapshots are plain data: they pickle and copy.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import pytest

import meterage

DEFAULT_LIMIT = 2000
SURROGATE = "\udc80"
VALID_PROBES = ("cpu", "rusage", "io", "gpu")


def recorded() -> list[tuple[str, dict, int]]:
    """Everything the snapshot holds (each test starts from an empty one)."""
    return [(s.operation, s.attributes, s.count) for s in meterage.snapshot()]


# Counters.


def test_counter_add_none_is_refused(unique: Callable[..., str]) -> None:
    counter = meterage.counter(unique())
    with pytest.raises(TypeError, match=r"int or float.*NoneType"):
        counter.add(None)
    with pytest.raises(TypeError, match=r"int or float.*NoneType"):
        counter.add(None, attributes={"a": 1})
    assert counter.value() == 0.0 and counter.value({"a": 1}) == 0.0
    assert recorded() == []
    counter.add()  # the default amount is 1
    assert counter.value() == 1.0


# Probes.


@pytest.mark.parametrize("probes", [123, 1.5, object()])
def test_probes_that_are_not_an_iterable_of_names(unique: Callable[..., str], probes: Any) -> None:
    name = unique()
    with pytest.raises(TypeError, match="probe names") as raised:
        meterage.meter(name, probes=probes)
    assert type(probes).__name__ in str(raised.value)
    with pytest.raises(TypeError, match="probe names"):
        meterage.meter(probes=probes)
    assert recorded() == []


def test_available_probes_takes_a_list_of_names_not_a_str() -> None:
    with pytest.raises(TypeError, match="probe names") as raised:
        meterage.available_probes("cpu")
    assert "str" in str(raised.value)
    assert meterage.available_probes(["cpu"]) == {"cpu": None}


def test_available_probes_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match='"nope"') as raised:
        meterage.available_probes(["nope"])
    for valid in VALID_PROBES:
        assert f'"{valid}"' in str(raised.value)
    with pytest.raises(ValueError, match='"nope"'):
        meterage.available_probes(["cpu", "nope"])


# GPU selection.


@pytest.mark.parametrize("index", [2**70, 2**32, -1])
def test_gpu_indices_out_of_range(index: int) -> None:
    with pytest.raises(ValueError, match="out of range") as raised:
        meterage.configure(gpu_devices=[index])
    assert str(index) in str(raised.value)
    assert meterage.configure()["cardinality_limit"] == DEFAULT_LIMIT


# Lone surrogates cannot be exported: a ValueError that says so, at the call that takes them.


def _surrogate_calls(name: str) -> list[tuple[str, Callable[[], Any]]]:
    histogram = meterage.histogram(name + ".h")
    counter = meterage.counter(name + ".c")

    def qualname_with_surrogate() -> None:
        pass

    qualname_with_surrogate.__qualname__ = "f" + SURROGATE
    return [
        ("operation name", lambda: meterage.meter(name + SURROGATE)),
        ("operation name", lambda: meterage.meter(qualname_with_surrogate)),
        ("histogram name", lambda: meterage.histogram(name + SURROGATE)),
        ("counter name", lambda: meterage.counter(name + SURROGATE)),
        ("unit", lambda: meterage.histogram(name + ".u", unit=SURROGATE)),
        ("description", lambda: meterage.histogram(name + ".d", description=SURROGATE)),
        ("unit", lambda: meterage.counter(name + ".cu", unit="x" + SURROGATE)),
        ("description", lambda: meterage.counter(name + ".cd", description=SURROGATE)),
        ("attribute key", lambda: meterage.meter(name, attributes={SURROGATE: 1})),
        ('attribute "k"', lambda: meterage.meter(name, attributes={"k": SURROGATE})),
        ("attribute key", lambda: histogram.record(1, attributes={SURROGATE: 1})),
        ('attribute "k"', lambda: histogram.record(1, attributes={"k": "v" + SURROGATE})),
        ("attribute key", lambda: counter.add(1, attributes={SURROGATE: "v"})),
        ('attribute "k"', lambda: counter.add(1, attributes={"k": SURROGATE})),
        ('attribute "k"', lambda: histogram.bind({"k": SURROGATE})),
        ("attribute key", lambda: counter.bind({SURROGATE: 1})),
    ]


@pytest.mark.parametrize("index", range(16))
def test_lone_surrogates_are_refused(unique: Callable[..., str], index: int) -> None:
    argument, call = _surrogate_calls(unique())[index]
    with pytest.raises(ValueError, match="lone surrogate") as raised:
        call()
    # A ValueError of meterage's that names the argument, not a codec's UnicodeEncodeError.
    assert type(raised.value) is ValueError
    assert argument in str(raised.value)
    assert recorded() == []


@pytest.mark.parametrize(("key", "value"), [(SURROGATE, 1), ("k", SURROGATE)], ids=["key", "value"])
def test_lone_surrogates_in_call_attributes_are_refused(
    unique: Callable[..., str], key: str, value: Any
) -> None:
    name = unique()
    argument = "attribute key" if key == SURROGATE else 'attribute "k"'
    with meterage.meter(name, probes=()) as call:
        for refused in (
            lambda: call.set_attribute(key, value),
            lambda: call.set_attributes({"ok": 1, key: value}),
        ):
            with pytest.raises(ValueError, match="lone surrogate") as raised:
                refused()
            assert type(raised.value) is ValueError
            assert argument in str(raised.value)
    # The call is recorded, without the attributes that were refused.
    assert recorded() == [(name, {}, 1)]


# Sampling rates below the minimum.


@pytest.mark.parametrize("sample", [1e-300, 5e-324, 1e-7])
def test_a_sample_below_the_minimum_is_refused(unique: Callable[..., str], sample: float) -> None:
    name = unique()
    with pytest.raises(ValueError, match="sample") as raised:
        meterage.meter(name, sample=sample)
    assert f"{meterage.MIN_SAMPLE:g}" in str(raised.value)
    with pytest.raises(ValueError, match="sample"):
        meterage.meter(sample=sample)
    assert recorded() == []
    with meterage.meter(name, sample=meterage.MIN_SAMPLE, probes=()):
        pass
    assert recorded() == [(name, {}, 1)]


# Snapshots are plain data.

HISTOGRAM_FIELDS = ("count", "sum", "min", "max", "mean", "unit", "scale", "offset")
HISTOGRAM_FIELDS += ("zero_count", "bucket_counts", "estimated_sum")
SERIES_FIELDS = ("kind", "operation", "name", "unit", "description", "attributes", "count")
SERIES_FIELDS += ("sampled", "value", "exemplars", "active")


def _histogram_state(h: meterage.HistogramSnapshot) -> tuple:
    fields = tuple(getattr(h, name) for name in HISTOGRAM_FIELDS)
    quantiles = tuple(h.quantile(q) for q in (0.0, 0.1, 0.5, 0.9, 0.99, 1.0))
    return (*fields, *quantiles, h.buckets())


def _series_state(s: meterage.Series) -> tuple:
    fields = tuple(getattr(s, name) for name in SERIES_FIELDS)
    histograms = {name: _histogram_state(h) for name, h in s.histograms.items()}
    totals = {name: s.estimated_total(name) for name in s.histograms if s.kind == "call"}
    return (*fields, histograms, totals)


COPIES = {
    "pickle": lambda x: pickle.loads(pickle.dumps(x)),
    "pickle0": lambda x: pickle.loads(pickle.dumps(x, protocol=0)),
    "copy": copy.copy,
    "deepcopy": copy.deepcopy,
}


@pytest.mark.parametrize("how", sorted(COPIES))
def test_series_and_histogram_snapshots_round_trip(unique: Callable[..., str], how: str) -> None:
    meterage._native.set_active_tracking(True)
    try:
        op = unique("op")

        @meterage.meter(op, attributes={"a": 1, "f": 1.5, "b": True, "s": "x"}, sample=1.0)
        def work(n: int) -> int:
            return sum(range(n))

        for n in range(0, 5000, 100):
            work(n)
        histogram = meterage.histogram(unique("h"), unit="ms", description="a histogram")
        for value in (0, 0, 0.5, 3.5, 1e6):
            histogram.record(value, attributes={"k": "v"})
        counter = meterage.counter(unique("c"), unit="{item}", description="a counter")
        counter.add(2.5, attributes={"k": "v"})
        series = [
            s for s in meterage.snapshot() if s.operation in {op, histogram.name, counter.name}
        ]
        assert sorted(s.kind for s in series) == ["call", "counter", "histogram"]
    finally:
        meterage._native.set_active_tracking(False)
    duplicate = COPIES[how]
    for original in series:
        twin = duplicate(original)
        assert type(twin) is type(original)
        assert _series_state(twin) == _series_state(original), original.kind
        for name, h in original.histograms.items():
            alone = duplicate(h)
            assert type(alone) is type(h)
            assert _histogram_state(alone) == _histogram_state(h), name
            assert _histogram_state(alone.merge(h)) == _histogram_state(h.merge(h))
    call = next(s for s in series if s.kind == "call")
    assert call.count == 50 and call.histograms["duration"].count == 50
    h = next(s for s in series if s.kind == "histogram").histograms[histogram.name]
    assert (h.count, h.zero_count, h.sum, h.max) == (5, 2, 1000004.0, 1e6)


def test_restoring_a_histogram_with_overflowing_counts_is_a_value_error(
    unique: Callable[..., str],
) -> None:
    histogram = meterage.histogram(unique())
    histogram.record(1.5)
    restore, (state, unit) = histogram.snapshot().__reduce__()
    assert pickle.loads(pickle.dumps(histogram.snapshot())).count == 1
    bad = list(state)
    bad[1] = 1  # count
    bad[7] = [2**64 - 1, 2]  # bucket counts that add up to 1 modulo 2**64
    try:
        restore(tuple(bad), unit)
    except ValueError:
        return
    except BaseException as error:
        pytest.fail(f"{type(error).__name__}: {error}")
    pytest.fail("accepted")
