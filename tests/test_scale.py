"""Scale and the instrument fast path: many series, memory per series, attribute lookup,
bound handles, and meters made inline.
"""

from __future__ import annotations

import collections
import math
import re
import struct
import types
from collections.abc import Callable

import pytest

import meterage

DEFAULT_LIMIT = 2000
OVERFLOW = {"otel.metric.overflow": True}


def series_of(operation: str) -> list[meterage.Series]:
    return [s for s in meterage.snapshot() if s.operation == operation]


def by_attributes(operation: str) -> dict[str, meterage.Series]:
    found = {repr(sorted(s.attributes.items())): s for s in series_of(operation)}
    assert len(found) == len(series_of(operation)), "two series with one attribute set"
    return found


def key(attributes: dict) -> str:
    return repr(sorted(attributes.items()))


# 1. 100,000 series of one instrument, and of one meter.

MANY = 100_000


def test_a_hundred_thousand_series_of_one_histogram(unique: Callable[..., str]) -> None:
    meterage.configure(cardinality_limit=MANY)
    name = unique()
    histogram = meterage.histogram(name)
    # The attribute-less series, recorded into, is one of the MANY.
    histogram.record(0.25)
    for i in range(1, MANY):
        histogram.record(i, attributes={"i": i})
    histogram.record(7, attributes={"i": MANY})  # the 100,001st: overflow
    histogram.record(3, attributes={"i": 1})  # an existing series stays its own
    found = by_attributes(name)
    assert len(found) == MANY + 1
    for i in range(2, MANY):
        h = found[key({"i": i})].histograms[name]
        assert (h.count, h.sum, h.min, h.max) == (1, float(i), float(i), float(i)), i
    first = found[key({"i": 1})].histograms[name]
    assert (first.count, first.sum, first.min, first.max) == (2, 4.0, 1.0, 3.0)
    none = found[key({})].histograms[name]
    assert (none.count, none.sum) == (1, 0.25)
    overflow = found[key(OVERFLOW)].histograms[name]
    assert (overflow.count, overflow.sum) == (1, 7.0)


def test_a_hundred_thousand_series_of_one_meter(unique: Callable[..., str]) -> None:
    meterage.configure(cardinality_limit=MANY)
    name = unique()
    meter = meterage.meter(name, probes=())
    with meter:  # the attribute-less series is one of the MANY
        pass
    for i in range(1, MANY + 1):  # the last one overflows
        for _ in range(2 if i % 1000 == 0 else 1):
            with meter as call:
                call.set_attribute("i", i)
    found = by_attributes(name)
    assert len(found) == MANY + 1
    for i in range(1, MANY):
        assert found[key({"i": i})].count == (2 if i % 1000 == 0 else 1), i
    assert found[key({})].count == 1
    assert found[key(OVERFLOW)].count == 2  # i == MANY, called twice


@pytest.mark.parametrize("how", ["histogram", "counter", "set_attribute"])
def test_an_unused_attribute_less_series_takes_no_cardinality(
    unique: Callable[..., str], how: str
) -> None:
    meterage.configure(cardinality_limit=10)
    name = unique()
    if how == "histogram":
        histogram = meterage.histogram(name)
        for i in range(10):
            histogram.record(1, attributes={"i": i})
    elif how == "counter":
        counter = meterage.counter(name)
        for i in range(10):
            counter.add(1, attributes={"i": i})
    else:
        meter = meterage.meter(name, probes=())
        for i in range(10):
            with meter as call:
                call.set_attribute("i", i)
    assert sorted(by_attributes(name)) == sorted(key({"i": i}) for i in range(10))


# 2. The cardinality limit's bounds.


def test_cardinality_limit_bounds() -> None:
    maximum = meterage.MAX_CARDINALITY_LIMIT
    assert maximum == 1_000_000
    with pytest.raises(ValueError, match=f"{maximum}"):
        meterage.configure(cardinality_limit=maximum + 1)
    for bad in (0, -1, 10**30):
        with pytest.raises(ValueError, match="cardinality_limit"):
            meterage.configure(cardinality_limit=bad)
    for bad in (True, 1.0, 1.5, "10"):
        with pytest.raises(TypeError, match="cardinality_limit"):
            meterage.configure(cardinality_limit=bad)
    assert meterage.configure()["cardinality_limit"] == DEFAULT_LIMIT
    assert meterage.configure(cardinality_limit=maximum)["cardinality_limit"] == maximum


# 3. Memory per series.

SERIES = 1000
VALUES = [1e-5 * (1 + 3 * k / 99) for k in range(100)]  # 1e-5 .. 4e-5


def test_memory_per_timer_only_series(unique: Callable[..., str]) -> None:
    meterage.configure(cardinality_limit=SERIES)
    name = unique()
    meter = meterage.meter(name, probes=())
    before = meterage._native.memory_bytes()
    for s in range(SERIES):
        for _ in range(100):
            with meter as call:
                call.set_attribute("s", s)
    per_series = (meterage._native.memory_bytes() - before) / SERIES
    assert [s.count for s in series_of(name)] == [100] * SERIES
    assert per_series <= 2048, per_series


def test_memory_per_histogram_series(unique: Callable[..., str]) -> None:
    meterage.configure(cardinality_limit=SERIES + 1)
    name = unique()
    histogram = meterage.histogram(name)
    before = meterage._native.memory_bytes()
    for s in range(SERIES):
        for value in VALUES:
            histogram.record(value, attributes={"s": s})
    per_series = (meterage._native.memory_bytes() - before) / SERIES
    assert [s.count for s in series_of(name)] == [100] * SERIES
    # A compact histogram: ~176 B plus ~144 B per octave of values (two octaves here).
    assert per_series <= 1024, per_series


# 4. Histogram.record(v, attributes=d): the fast path finds the series the slow path would.


def test_value_types_keep_series_apart(unique: Callable[..., str]) -> None:
    name = unique()
    histogram = meterage.histogram(name)
    for attributes in ({"a": 1}, {"a": True}, {"a": 1.0}, {"a": 1}, {"a": True}, {"a": 1.0}):
        histogram.record(1, attributes=attributes)
    found = series_of(name)
    assert sorted((repr(s.attributes), s.count) for s in found) == [
        ("{'a': 1.0}", 2),
        ("{'a': 1}", 2),
        ("{'a': True}", 2),
    ]
    assert {type(s.attributes["a"]) for s in found} == {int, bool, float}


def test_key_order_does_not_matter(unique: Callable[..., str]) -> None:
    name = unique()
    histogram = meterage.histogram(name)
    histogram.record(1, attributes={"a": 1, "b": "x"})
    histogram.record(2, attributes={"b": "x", "a": 1})
    assert [(s.attributes, s.count) for s in series_of(name)] == [({"a": 1, "b": "x"}, 2)]


def test_mappings_and_subclasses_land_in_the_series_of_the_equal_plain_dict(
    unique: Callable[..., str],
) -> None:
    class Dict(dict):
        pass

    class Str(str):
        pass

    class Int(int):
        pass

    class Float(float):
        pass

    name = unique()
    histogram = meterage.histogram(name)
    plain = {"k": "v", "n": 2, "f": 0.5, "b": False}
    variants = [
        plain,
        types.MappingProxyType(plain),
        Dict(plain),
        collections.OrderedDict(reversed(plain.items())),
        {Str("k"): Str("v"), "n": Int(2), "f": Float(0.5), "b": False},
        dict(plain),
    ]
    for variant in variants:
        histogram.record(1, attributes=variant)
    found = series_of(name)
    assert [(s.attributes, s.count) for s in found] == [(plain, len(variants))]
    assert {k: type(v) for k, v in found[0].attributes.items()} == {
        k: type(v) for k, v in plain.items()
    }


@pytest.mark.parametrize("number", [2**63, -(2**63) - 1, 2**64, 2**200])
def test_ints_beyond_64_bits_are_refused(unique: Callable[..., str], number: int) -> None:
    name = unique()
    histogram = meterage.histogram(name)
    with pytest.raises(ValueError, match="64 bits"):
        histogram.record(1, attributes={"a": number})
    with pytest.raises(ValueError, match="64 bits"):
        histogram.record(1, attributes=types.MappingProxyType({"a": number}))
    histogram.record(1, attributes={"a": 2**63 - 1})
    histogram.record(1, attributes={"a": -(2**63)})
    assert sorted(s.attributes["a"] for s in series_of(name)) == [-(2**63), 2**63 - 1]


def test_an_empty_key_is_refused(unique: Callable[..., str]) -> None:
    name = unique()
    histogram = meterage.histogram(name)
    for attributes in ({"": 1}, {"a": 1, "": "x"}, types.MappingProxyType({"": 1})):
        with pytest.raises(ValueError, match="empty"):
            histogram.record(1, attributes=attributes)
    assert series_of(name) == []


def test_the_same_nan_object_is_one_series(unique: Callable[..., str]) -> None:
    name = unique()
    histogram = meterage.histogram(name)
    for _ in range(3):
        histogram.record(1, attributes={"x": float("nan")})
    (series,) = series_of(name)
    assert series.count == 3 and math.isnan(series.attributes["x"])


def test_every_nan_is_one_series(unique: Callable[..., str]) -> None:
    name = unique()
    histogram = meterage.histogram(name)
    payload_nan = struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_0000_0001))[0]
    for nan in (float("nan"), -float("nan"), payload_nan):
        assert math.isnan(nan)
        histogram.record(1, attributes={"x": nan})
    assert [s.count for s in series_of(name)] == [3]


def test_the_same_dict_records_into_a_visible_series_after_reset(
    unique: Callable[..., str],
) -> None:
    name = unique()
    histogram = meterage.histogram(name)
    attributes = {"a": 1, "s": "x"}
    histogram.record(1, attributes=attributes)
    meterage.reset()
    assert series_of(name) == []
    histogram.record(2, attributes=attributes)
    (series,) = series_of(name)
    assert (series.attributes, series.count, series.histograms[name].sum) == (attributes, 1, 2.0)
    assert histogram.snapshot(attributes).count == 1


# 5. Bound handles.


def test_bound_handles_land_in_the_series_of_record_and_add(unique: Callable[..., str]) -> None:
    h_name, c_name = unique("h"), unique("c")
    histogram = meterage.histogram(h_name)
    counter = meterage.counter(c_name)
    attributes = {"a": 1, "s": "x"}
    bound = histogram.bind(attributes)
    bound_counter = counter.bind({"s": "x", "a": 1})
    bound.record(2.5)
    histogram.record(3.5, attributes=attributes)
    bound_counter.add()
    bound_counter.add(2)
    counter.add(3, attributes=attributes)
    (h,) = series_of(h_name)
    assert (h.attributes, h.count, h.histograms[h_name].sum) == (attributes, 2, 6.0)
    (c,) = series_of(c_name)
    assert (c.attributes, c.count, c.value) == (attributes, 3, 6.0)
    assert bound.attributes == attributes and bound_counter.attributes == attributes
    assert bound.snapshot().count == 2 and bound_counter.value() == 6.0


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (None, TypeError),
        ("1", TypeError),
        (True, TypeError),
        ([1], TypeError),
        (-1, ValueError),
        (-0.5, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (2**1100, ValueError),
    ],
)
def test_bound_handles_refuse_what_record_and_add_refuse(
    unique: Callable[..., str], value: object, error: type[Exception]
) -> None:
    h_name, c_name = unique("h"), unique("c")
    histogram = meterage.histogram(h_name)
    counter = meterage.counter(c_name)
    bound = histogram.bind({"a": 1})
    bound_counter = counter.bind({"a": 1})
    for call in (
        lambda: histogram.record(value, attributes={"a": 1}),
        lambda: bound.record(value),
        lambda: counter.add(value, attributes={"a": 1}),
        lambda: bound_counter.add(value),
    ):
        with pytest.raises(error) as raised:
            call()
        assert "values" in str(raised.value) or "amounts" in str(raised.value)
    assert series_of(h_name) == [] and series_of(c_name) == []


@pytest.mark.parametrize(
    ("attributes", "error"),
    [({"": 1}, ValueError), ({"a": None}, TypeError), ({"a": 2**64}, ValueError), ("a", TypeError)],
)
def test_binding_refuses_what_record_refuses(
    unique: Callable[..., str], attributes: object, error: type[Exception]
) -> None:
    name = unique()
    histogram = meterage.histogram(name)
    counter = meterage.counter(unique("c"))
    for bind in (histogram.bind, counter.bind):
        with pytest.raises(error):
            bind(attributes)
    assert series_of(name) == []


def test_bound_handles_past_the_cardinality_limit_record_into_overflow(
    unique: Callable[..., str],
) -> None:
    meterage.configure(cardinality_limit=3)
    h_name, c_name = unique("h"), unique("c")
    histogram = meterage.histogram(h_name)
    counter = meterage.counter(c_name)
    histogram.record(1)  # the attribute-less series is one of the 3
    counter.add(1)
    bound = [histogram.bind({"i": i}) for i in range(4)]
    bound_counters = [counter.bind({"i": i}) for i in range(4)]
    for i, (b, c) in enumerate(zip(bound, bound_counters, strict=True)):
        b.record(i + 1)
        c.add(i + 1)
    assert bound[2].attributes == OVERFLOW and bound[3].attributes == OVERFLOW
    found = by_attributes(h_name)
    assert {k: s.count for k, s in found.items()} == {
        key({}): 1,
        key({"i": 0}): 1,
        key({"i": 1}): 1,
        key(OVERFLOW): 2,
    }
    assert found[key(OVERFLOW)].histograms[h_name].sum == 7.0
    values = {k: s.value for k, s in by_attributes(c_name).items()}
    assert values == {key({}): 1.0, key({"i": 0}): 1.0, key({"i": 1}): 2.0, key(OVERFLOW): 7.0}


def test_bound_handle_repr_shows_python_values(unique: Callable[..., str]) -> None:
    text = repr(meterage.histogram(unique()).bind({"a": 1, "s": "x", "b": True}))
    assert not re.search(r"\b(Int|Str|Bool|Float)\(", text), text


# 6. Meters made inline share one core.


def test_an_inline_meter_shares_its_sampling_state(unique: Callable[..., str]) -> None:
    name = unique()
    for _ in range(20_000):
        with meterage.meter(name):
            pass
    (series,) = series_of(name)
    assert series.count == 20_000
    assert series.sampled < series.count / 2, series.sampled


def test_meters_made_twice_record_into_one_series(unique: Callable[..., str]) -> None:
    name = unique()
    first, second = meterage.meter(name, probes=()), meterage.meter(name, probes=())
    with first:
        pass
    with second:
        pass

    @meterage.meter(name, probes=())
    def work() -> None:
        pass

    work()
    assert [(s.attributes, s.count) for s in series_of(name)] == [({}, 3)]
