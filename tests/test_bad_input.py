"""Every kind of bad input gets a clear TypeError or ValueError, records nothing, and never
changes what the metered code does."""

from __future__ import annotations

import math
import types
from collections import OrderedDict

import pytest

import meterage

BAD_NAMES_TYPE = [None, 3, 1.5, b"bytes", ["list"], ("t",), True]
BAD_ATTRIBUTE_VALUES = [None, [1], (1,), {"a": 1}, b"x", object(), 1j, {1}]


# ---- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES_TYPE, ids=repr)
def test_meter_name_must_be_a_str(name):
    with pytest.raises(TypeError):
        meterage.meter(name)


@pytest.mark.parametrize("factory", [meterage.histogram, meterage.counter])
@pytest.mark.parametrize("name", BAD_NAMES_TYPE, ids=repr)
def test_instrument_name_must_be_a_str(factory, name):
    with pytest.raises(TypeError, match="must be a str"):
        factory(name)


@pytest.mark.parametrize(
    "factory",
    [meterage.meter, meterage.histogram, meterage.counter, meterage.Meter],
)
def test_empty_names_are_rejected(factory):
    with pytest.raises(ValueError, match="must not be empty"):
        factory("")
    assert meterage.snapshot() == []


def test_instruments_reject_empty_names_also_natively():
    with pytest.raises(ValueError):
        meterage.Histogram("")
    with pytest.raises(ValueError):
        meterage.Counter("")


@pytest.mark.parametrize("field", ["unit", "description"])
@pytest.mark.parametrize("factory", [meterage.histogram, meterage.counter])
def test_instrument_unit_and_description_must_be_str(unique, factory, field):
    with pytest.raises(TypeError, match=field):
        factory(unique(), **{field: 5})


# ---- probes ------------------------------------------------------------------------------------


def test_unknown_probe_lists_the_valid_ones(unique):
    with pytest.raises(ValueError, match=r"unknown probe ('tpu'|\"tpu\")") as info:
        meterage.meter(unique(), probes=("cpu", "tpu"))
    message = str(info.value)
    for valid in ("cpu", "rusage", "io", "gpu"):
        assert f'"{valid}"' in message or f"'{valid}'" in message, message


@pytest.mark.parametrize("probes", ["cpu", 5, (1,), [None], ("cpu", b"io")], ids=repr)
def test_probes_must_be_an_iterable_of_names(unique, probes):
    with pytest.raises(TypeError):
        meterage.meter(unique(), probes=probes)


def test_probes_accept_any_iterable_of_names(unique):
    assert meterage.meter(unique(), probes=iter(["io"])).probes == ("io",)
    assert meterage.meter(unique(), probes={"cpu": 1}).probes == ("cpu",)
    assert meterage.meter(unique(), probes=("cpu", "cpu")).probes == ("cpu",)


# ---- sample and budget ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.0000001, 2, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("keyword", ["sample", "budget"])
def test_fractions_outside_zero_one_are_rejected(unique, keyword, value):
    with pytest.raises(ValueError, match=keyword):
        meterage.meter(unique(), **{keyword: value})


@pytest.mark.parametrize("value", ["0.5", True, False, [0.5], object()], ids=repr)
@pytest.mark.parametrize("keyword", ["sample", "budget"])
def test_fractions_must_be_numbers(unique, keyword, value):
    with pytest.raises(TypeError, match=keyword):
        meterage.meter(unique(), **{keyword: value})


@pytest.mark.parametrize("value", [1, 1.0, 0.25, meterage.MIN_SAMPLE])
def test_valid_fractions_are_accepted(unique, value):
    assert meterage.meter(unique(), sample=value).sample_rate == pytest.approx(value)
    meterage.meter(unique(), budget=value)


@pytest.mark.parametrize("keyword", ["sample", "budget"])
def test_huge_int_fraction_is_a_value_error(unique, keyword):
    with pytest.raises(ValueError, match=keyword):
        meterage.meter(unique(), **{keyword: 10**400})
    with pytest.raises(ValueError, match="budget"):
        meterage.configure(budget=10**400)


def test_sample_and_budget_together_are_rejected(unique):
    with pytest.raises(ValueError, match="either sample"):
        meterage.meter(unique(), sample=0.5, budget=0.5)


# ---- attributes -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", BAD_ATTRIBUTE_VALUES, ids=repr)
def test_static_attribute_values_must_be_scalars(unique, value):
    with pytest.raises(TypeError, match="allowed types are str, int, float and bool"):
        meterage.meter(unique(), attributes={"key": value})


@pytest.mark.parametrize("value", BAD_ATTRIBUTE_VALUES, ids=repr)
def test_dynamic_attribute_values_must_be_scalars(unique, series_of, value):
    name = unique()
    with meterage.meter(name) as call:
        with pytest.raises(TypeError):
            call.set_attribute("key", value)
        with pytest.raises(TypeError):
            call.set_attributes({"key": value})
        assert call.attributes == {}
    # The call itself is still recorded, without the rejected attribute.
    assert [(s.attributes, s.count) for s in series_of(name)] == [({}, 1)]


@pytest.mark.parametrize("value", BAD_ATTRIBUTE_VALUES, ids=repr)
def test_instrument_attribute_values_must_be_scalars(unique, series_of, value):
    name = unique()
    histogram = meterage.histogram(name)
    counter = meterage.counter(unique())
    with pytest.raises(TypeError):
        histogram.record(1, attributes={"key": value})
    with pytest.raises(TypeError):
        counter.add(1, attributes={"key": value})
    assert meterage.snapshot() == []


@pytest.mark.parametrize("key", [1, None, b"k", ("k",)], ids=repr)
def test_attribute_keys_must_be_str(unique, key):
    with pytest.raises(TypeError, match="keys must be str"):
        meterage.meter(unique(), attributes={key: "v"})
    with meterage.meter(unique()) as call, pytest.raises(TypeError):
        call.set_attribute(key, "v")
    with pytest.raises(TypeError):
        meterage.histogram(unique()).record(1, attributes={key: "v"})


def test_attribute_keys_must_not_be_empty(unique):
    with pytest.raises(ValueError, match="must not be empty"):
        meterage.meter(unique(), attributes={"": "v"})
    with meterage.meter(unique()) as call, pytest.raises(ValueError):
        call.set_attribute("", "v")


def test_int_attributes_beyond_64_bits_are_rejected(unique):
    with pytest.raises(ValueError, match="64 bits"):
        meterage.meter(unique(), attributes={"big": 2**63})
    assert meterage.meter(unique(), attributes={"big": 2**63 - 1}).attributes == {"big": 2**63 - 1}
    assert meterage.meter(unique(), attributes={"small": -(2**63)}).attributes == {
        "small": -(2**63)
    }


@pytest.mark.parametrize("attributes", [[("k", "v")], "k=v", 5, {("k", "v")}], ids=repr)
def test_attributes_must_be_a_mapping(unique, attributes):
    with pytest.raises(TypeError, match="attributes must be"):
        meterage.meter(unique(), attributes=attributes)
    with pytest.raises(TypeError):
        meterage.histogram(unique()).record(1, attributes=attributes)


def test_dict_subclasses_are_accepted_as_attributes(unique):
    assert meterage.meter(unique(), attributes=OrderedDict(a=1)).attributes == {"a": 1}


def test_read_only_mappings_are_accepted_as_attributes(unique):
    # The attributes are annotated Mapping[str, ...]: any mapping works, not only dict.
    proxy = types.MappingProxyType({"a": 1})
    assert meterage.meter(unique(), attributes=proxy).attributes == {"a": 1}
    histogram = meterage.histogram(unique())
    histogram.record(3, attributes=proxy)
    assert histogram.snapshot({"a": 1}).sum == 3


def test_nan_float_attribute_is_a_valid_value(unique, one_series):
    # Floats are allowed, NaN included; the same NaN set is the same series.
    name = unique()
    histogram = meterage.histogram(name)
    histogram.record(1, attributes={"x": math.nan})
    histogram.record(2, attributes={"x": math.nan})
    assert one_series(name).count == 2


# ---- recorded values ------------------------------------------------------------------------


BAD_VALUES_VALUE = [math.nan, math.inf, -math.inf, -1, -1e-300, -(10**6)]
BAD_VALUES_TYPE = ["1", None, True, False, [1], b"1", 1j, object()]


@pytest.mark.parametrize("value", BAD_VALUES_VALUE, ids=repr)
def test_histogram_rejects_nan_inf_and_negative_values(unique, value):
    histogram = meterage.histogram(unique())
    with pytest.raises(ValueError, match="finite and not negative"):
        histogram.record(value)
    with pytest.raises(ValueError):
        histogram.record(value, attributes={"a": 1})
    assert histogram.snapshot().count == 0
    assert meterage.snapshot() == []


@pytest.mark.parametrize("value", BAD_VALUES_TYPE, ids=repr)
def test_histogram_rejects_non_numbers(unique, value):
    histogram = meterage.histogram(unique())
    with pytest.raises(TypeError, match="int or float"):
        histogram.record(value)
    assert meterage.snapshot() == []


def test_histogram_value_too_large_for_a_float(unique):
    histogram = meterage.histogram(unique())
    # float(10**400) itself raises OverflowError, the ArithmeticError Python uses here.
    with pytest.raises((ValueError, OverflowError)):
        histogram.record(10**400)
    assert meterage.snapshot() == []


@pytest.mark.parametrize("value", [*BAD_VALUES_VALUE], ids=repr)
def test_counter_rejects_nan_inf_and_negative_amounts(unique, value):
    counter = meterage.counter(unique())
    with pytest.raises(ValueError, match="finite and not negative"):
        counter.add(value)
    assert counter.value() == 0
    assert meterage.snapshot() == []


@pytest.mark.parametrize("value", [v for v in BAD_VALUES_TYPE if v is not None], ids=repr)
def test_counter_rejects_non_numbers(unique, value):
    counter = meterage.counter(unique())
    with pytest.raises(TypeError, match="int or float"):
        counter.add(value)
    assert meterage.snapshot() == []


def test_a_rejected_value_leaves_earlier_values_intact(unique):
    histogram = meterage.histogram(unique())
    histogram.record(2)
    with pytest.raises(ValueError):
        histogram.record(math.nan)
    snapshot = histogram.snapshot()
    assert (snapshot.count, snapshot.sum, snapshot.min, snapshot.max) == (1, 2, 2, 2)


# ---- decorating -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", [42, None, 1.5, [], b"x", object()], ids=repr)
def test_decorating_a_non_callable_is_a_type_error(unique, target):
    with pytest.raises(TypeError, match="callable"):
        meterage.meter(unique())(target)
    with pytest.raises(TypeError):
        meterage.meter(target)


# ---- configure ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, -(2**40)])
def test_configure_rejects_non_positive_cardinality(value):
    with pytest.raises(ValueError, match="cardinality_limit"):
        meterage.configure(cardinality_limit=value)
    assert meterage.configure()["cardinality_limit"] == 2000


@pytest.mark.parametrize("value", [1.5, "10", True, [3], object()], ids=repr)
def test_configure_rejects_non_int_cardinality(value):
    with pytest.raises(TypeError, match="cardinality_limit"):
        meterage.configure(cardinality_limit=value)
    assert meterage.configure()["cardinality_limit"] == 2000


@pytest.mark.parametrize("value", [0, -0.1, 1.5, math.nan, math.inf])
def test_configure_rejects_budgets_outside_zero_one(value):
    with pytest.raises(ValueError, match="budget"):
        meterage.configure(budget=value)
    assert meterage.configure()["budget"] == 0.01


@pytest.mark.parametrize("value", ["0.1", True, [0.1]], ids=repr)
def test_configure_rejects_non_number_budgets(value):
    with pytest.raises(TypeError, match="budget"):
        meterage.configure(budget=value)
    assert meterage.configure()["budget"] == 0.01


def test_configure_is_keyword_only():
    with pytest.raises(TypeError):
        meterage.configure(0.5)  # type: ignore[misc]


def test_configure_huge_cardinality_is_a_value_error():
    with pytest.raises(ValueError, match="cardinality_limit"):
        meterage.configure(cardinality_limit=2**70)
    assert meterage.configure()["cardinality_limit"] == 2000


def test_a_bad_configure_call_changes_nothing():
    meterage.configure(budget=0.2, cardinality_limit=30)
    with pytest.raises(ValueError):
        meterage.configure(budget=2.0, cardinality_limit=40)
    assert meterage.configure() == {"budget": 0.2, "cardinality_limit": 30}


# ---- the metered code is unchanged --------------------------------------------------------


def test_metered_function_behaviour_never_changes(unique):
    def original(items, *, scale=1):
        if not items:
            raise LookupError("empty")
        return [item * scale for item in items]

    metered = meterage.meter(unique(), attributes={"k": "v"}, probes=("cpu",), sample=1.0)(original)
    for args, kwargs in [(([1, 2],), {}), (([3],), {"scale": 2}), (("ab",), {"scale": 3})]:
        assert metered(*args, **kwargs) == original(*args, **kwargs)
    for bad_call in [lambda f: f([]), lambda f: f(), lambda f: f([1], scale=1, extra=2)]:
        with pytest.raises(Exception) as expected:
            bad_call(original)
        with pytest.raises(type(expected.value)) as actual:
            bad_call(metered)
        assert str(actual.value) == str(expected.value)


def test_a_rejected_dynamic_attribute_does_not_change_the_block(unique):
    # The TypeError is raised at the bad set_attribute; handled inside, the block carries on.
    name = unique()
    steps = []
    with meterage.meter(name) as call:
        steps.append(1)
        try:
            call.set_attribute("bad", [1])
        except TypeError:
            steps.append(2)
        call.set_attribute("good", 1)
        steps.append(3)
    assert steps == [1, 2, 3]
    assert [s.attributes for s in meterage.snapshot() if s.operation == name] == [{"good": 1}]


def test_estimated_total_requires_a_str(unique, one_series):
    name = unique()
    meterage.meter(name)(lambda: None)()
    with pytest.raises(TypeError):
        one_series(name).estimated_total(1)
