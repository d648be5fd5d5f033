"""``meterage.meter`` as a decorator and as a context manager: what is recorded, and that the
metered code behaves exactly as before (same results, same exceptions, same tracebacks)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import inspect
import pickle
import sys
import traceback
import types
import weakref
import zlib

import pytest

import meterage

ALL_MEASURES = {
    "duration",
    "cpu.time",
    "paging.faults.minor",
    "paging.faults.major",
    "context_switches.voluntary",
    "context_switches.involuntary",
    "io.read",
    "io.write",
    "disk.io.read",
    "disk.io.write",
}


class Boom(Exception):
    """A module-level exception: its ``__qualname__`` is just ``Boom``."""


class Outer:
    class Nested(Exception):
        """``__qualname__`` is ``Outer.Nested``: error.type must use it, not ``__name__``."""


@meterage.meter
def module_level_metered(x):
    return x * 2


# ---- the decorator -------------------------------------------------------------------------


def test_bare_decorator_uses_qualname_and_counts_every_call(one_series):
    @meterage.meter
    def handle(request):
        return request.upper()

    assert [handle("ok") for _ in range(7)] == ["OK"] * 7
    series = one_series(handle.__qualname__)
    assert (
        handle.__qualname__
        == "test_bare_decorator_uses_qualname_and_counts_every_call.<locals>.handle"
    )
    assert series.kind == "call"
    assert series.operation == series.name == handle.__qualname__
    assert series.attributes == {}
    assert series.count == 7
    duration = series.histograms["duration"]
    assert duration.count == 7
    assert duration.unit == "s"
    assert 0 < duration.min <= duration.max
    assert duration.min * 7 <= duration.sum <= duration.max * 7 * (1 + 1e-12)
    assert series.unit == "s"


def test_default_meter_runs_all_probes_and_reports_all_measures(unique, one_series):
    name = unique()
    f = meterage.meter(name, sample=1.0)(lambda: None)
    f()
    series = one_series(name)
    assert set(series.histograms) == ALL_MEASURES
    assert series.sampled == 1
    units = {key: h.unit for key, h in series.histograms.items()}
    assert units["duration"] == units["cpu.time"] == "s"
    for key in ("io.read", "io.write", "disk.io.read", "disk.io.write"):
        assert units[key] == "By"
    for key in ALL_MEASURES - {"duration"}:
        assert series.histograms[key].count == 1, key


def test_named_decorator_with_static_attributes(unique, one_series):
    name = unique("checkout")

    @meterage.meter(name, attributes={"tier": "gold", "n": 3, "ratio": 0.5, "vip": True})
    def checkout(cart):
        return sum(cart)

    assert checkout([1, 2]) == 3
    assert checkout(cart=[4]) == 4
    series = one_series(name)
    assert series.attributes == {"tier": "gold", "n": 3, "ratio": 0.5, "vip": True}
    # Types survive: the bool stays a bool and the int an int.
    assert type(series.attributes["vip"]) is bool
    assert type(series.attributes["n"]) is int
    assert series.count == 2


def test_probes_restrict_the_measures(unique, one_series):
    cases = {
        ("cpu",): {"duration", "cpu.time"},
        ("rusage",): {
            "duration",
            "paging.faults.minor",
            "paging.faults.major",
            "context_switches.voluntary",
            "context_switches.involuntary",
        },
        ("io",): {"duration", "io.read", "io.write", "disk.io.read", "disk.io.write"},
        ("cpu", "io"): {
            "duration",
            "cpu.time",
            "io.read",
            "io.write",
            "disk.io.read",
            "disk.io.write",
        },
        (): {"duration"},
    }
    for probes, expected in cases.items():
        name = unique("probes")
        f = meterage.meter(name, probes=probes, sample=1.0)(lambda: 1)
        f()
        series = one_series(name)
        assert set(series.histograms) == expected, probes
        assert series.sampled == (1 if probes else 0)


def test_timer_only_meter_has_no_sample_rate(unique):
    m = meterage.meter(unique(), probes=())
    assert m.probes == ()
    assert m.sample_rate == 0.0


def test_meter_properties_and_repr(unique):
    name = unique()
    m = meterage.meter(name, attributes={"a": 1}, probes=["io", "cpu"], sample=0.25)
    assert isinstance(m, meterage.Meter)
    assert m.name == name
    assert m.attributes == {"a": 1}
    # Fixed order, whatever order they were asked in.
    assert m.probes == ("cpu", "io")
    assert m.sample_rate == 0.25
    assert repr(m) == f"meterage.meter({name!r}, attributes={{'a': 1}}, probes=('cpu', 'io'))"
    default = meterage.meter(unique())
    assert default.probes == ("cpu", "rusage", "io")
    # Adaptive sampling starts by probing every call.
    assert default.sample_rate == 1.0


def test_every_call_is_counted_and_sample_one_probes_every_call(unique, one_series):
    name = unique()
    f = meterage.meter(name, sample=1.0)(lambda x: x)
    for i in range(500):
        assert f(i) == i
    series = one_series(name)
    assert series.count == 500
    assert series.sampled == 500
    assert series.histograms["cpu.time"].count == 500


def test_default_sampling_counts_every_call_but_probes_a_subset(unique, one_series):
    name = unique()
    f = meterage.meter(name)(lambda: None)
    for _ in range(20_000):
        f()
    series = one_series(name)
    assert series.count == 20_000
    # The first call is always probed (the rate starts at 1). An empty call costs far less
    # than its probes, so a 1% budget drives the rate to a small fraction (it is at most
    # 1% x wall/probe cost, and an empty call's wall time is below its probes' cost).
    assert 1 <= series.sampled < 20_000 // 2
    cpu = series.histograms["cpu.time"]
    assert cpu.count == series.sampled
    # Each probed call carries the weight 1/p >= 1 it was drawn with. (With a handful of
    # probed calls the estimate is too noisy to compare with anything; tests/test_probes.py
    # checks its accuracy where enough calls are probed.)
    assert series.estimated_total("cpu.time") >= cpu.sum


def test_functools_wraps_semantics(unique):
    def original(a: int, b: str = "x", *rest: float, flag: bool = False, **extra) -> str:
        """Original docstring."""
        return f"{a}{b}{rest}{flag}{extra}"

    original.custom_attribute = "kept"
    metered = meterage.meter(unique())(original)
    assert metered.__name__ == "original"
    assert metered.__qualname__ == original.__qualname__
    assert metered.__doc__ == "Original docstring."
    assert metered.__module__ == original.__module__
    assert metered.__wrapped__ is original
    assert metered.__annotations__ == original.__annotations__
    assert metered.custom_attribute == "kept"
    assert inspect.signature(metered) == inspect.signature(original)
    assert inspect.unwrap(metered) is original
    assert metered(1, "y", 2.0, flag=True, k=1) == original(1, "y", 2.0, flag=True, k=1)
    assert callable(metered)
    assert isinstance(metered, meterage.MeteredFunction)


def test_bare_decorator_keeps_wraps_semantics():
    @meterage.meter
    def documented(x, /, y=2):
        """Doc."""
        return x + y

    assert documented.__name__ == "documented"
    assert documented.__doc__ == "Doc."
    assert str(inspect.signature(documented)) == "(x, /, y=2)"
    assert documented(1) == 3


def test_metered_function_pickles_by_reference():
    assert pickle.loads(pickle.dumps(module_level_metered)) is module_level_metered
    assert module_level_metered(21) == 42


def test_repr_names_the_operation(unique):
    name = unique()
    f = meterage.meter(name)(len)
    assert repr(f).startswith(f'<meterage.meter("{name}") of <built-in function len>')
    assert f([1, 2, 3]) == 3


def test_arguments_and_results_pass_through_unchanged(unique):
    sentinel = object()

    @meterage.meter(unique())
    def echo(*args, **kwargs):
        return args, kwargs

    args, kwargs = echo(1, sentinel, key=sentinel)
    assert args == (1, sentinel) and args[1] is sentinel
    assert kwargs == {"key": sentinel} and kwargs["key"] is sentinel

    @meterage.meter(unique())
    def mutate(target):
        target.append(1)

    data = []
    assert mutate(data) is None
    assert data == [1]


def test_wrong_arguments_raise_the_same_type_error_as_the_original(unique, one_series):
    def two(a, b):
        return a + b

    name = unique()
    metered = meterage.meter(name)(two)
    with pytest.raises(TypeError) as plain:
        two(1)
    with pytest.raises(TypeError) as wrapped:
        metered(1)
    assert str(wrapped.value) == str(plain.value)
    # The failed call is still counted, under its error type.
    assert one_series(name, {"error.type": "TypeError"}).count == 1


def test_recursion_counts_every_level(unique, one_series):
    name = unique()

    @meterage.meter(name)
    def fact(n):
        return 1 if n <= 1 else n * fact(n - 1)

    assert fact(10) == 3628800
    assert one_series(name).count == 10


def test_decorating_a_class_is_refused_with_a_pointer_to_init():
    class Point:
        def __init__(self, x):
            self.x = x

    # The result would not be a class any more (isinstance would break).
    with pytest.raises(TypeError, match=r"Point.*__init__"):
        meterage.meter(Point)
    with pytest.raises(TypeError, match="class"):
        meterage.meter("point.new")(Point)


def test_decorating_a_builtin_or_partial(series_of, one_series):
    metered_len = meterage.meter(len)
    assert metered_len("abcd") == 4
    assert one_series("len").count == 1

    # partial objects have no __qualname__ or __name__: the type's qualname names them.
    metered_partial = meterage.meter(functools.partial(pow, 2))
    assert metered_partial(10) == 1024
    assert one_series("partial").count == 1


# ---- methods ---------------------------------------------------------------------------------


class Account:
    def __init__(self, balance):
        self.balance = balance

    @meterage.meter
    def deposit(self, amount):
        """Deposits."""
        self.balance += amount
        return self

    @meterage.meter("account.peek", sample=1.0)
    def peek(self):
        return self.balance

    @classmethod
    @meterage.meter
    def opened(cls, balance):
        return cls(balance)

    @staticmethod
    @meterage.meter
    def fee(amount):
        return amount // 100


def test_methods_bind_self(one_series):
    account = Account(10)
    assert account.deposit(5) is account
    assert account.balance == 15
    assert Account.deposit(account, 5) is account  # through the class: unbound
    assert account.balance == 20
    assert account.peek() == 20
    assert one_series("Account.deposit").count == 2
    assert one_series("account.peek").count == 1


def test_method_metadata_and_signature():
    account = Account(0)
    assert Account.deposit.__name__ == "deposit"
    assert Account.deposit.__qualname__ == "Account.deposit"
    assert Account.deposit.__doc__ == "Deposits."
    assert str(inspect.signature(Account.deposit)) == "(self, amount)"
    assert str(inspect.signature(account.deposit)) == "(amount)"
    bound = account.deposit
    assert bound.__self__ is account
    assert bound.__func__ is Account.__dict__["deposit"]


def test_classmethod_and_staticmethod_over_metered_functions(one_series):
    account = Account.opened(7)
    assert isinstance(account, Account) and account.balance == 7
    assert Account.fee(250) == 2
    assert Account(0).fee(999) == 9
    assert one_series("Account.opened").count == 1
    assert one_series("Account.fee").count == 2


def test_meter_applied_over_staticmethod_and_classmethod_keeps_the_binding(unique, one_series):
    name = unique()

    class Tools:
        @meterage.meter
        @staticmethod
        def double(x):
            return 2 * x

        @meterage.meter(name)
        @classmethod
        def make(cls, x):
            return cls, x

    assert Tools.double(2) == 4
    assert Tools().double(3) == 6
    assert Tools.make(1) == (Tools, 1)
    assert Tools().make(2) == (Tools, 2)
    assert isinstance(Tools.__dict__["double"], staticmethod)
    assert isinstance(Tools.__dict__["make"], classmethod)
    assert one_series(Tools.double.__qualname__).count == 2
    assert one_series(name).count == 2


# ---- errors ----------------------------------------------------------------------------------


def _frames(tb):
    out = []
    while tb is not None:
        out.append((tb.tb_frame.f_code.co_name, tb.tb_lineno))
        tb = tb.tb_next
    return out


def _catch(fn, *args):
    try:
        fn(*args)
    except BaseException as error:
        return error
    raise AssertionError("no exception")


def test_errors_propagate_unchanged_same_object_same_traceback(unique, one_series):
    error = Boom("broken", 42)
    cause = KeyError("root")

    def fail(x):
        try:
            raise cause
        except KeyError as inner:
            raise error from inner

    name = unique()
    metered = meterage.meter(name, attributes={"tier": "gold"})(fail)

    plain = _catch(fail, 1)
    plain_frames = _frames(plain.__traceback__)
    error.__traceback__ = None
    caught = _catch(metered, 1)
    assert caught is error
    assert caught.args == ("broken", 42)
    assert caught.__cause__ is cause
    assert caught.__context__ is cause
    # The metered wrapper adds no frame: the traceback is the same as without meterage.
    assert _frames(caught.__traceback__) == plain_frames
    assert [frame[0] for frame in plain_frames] == ["_catch", "fail"]
    # The failed call recorded under error.type, keeping the static attributes; it is the
    # operation's only series (nothing recorded as a success).
    failed = one_series(name)
    assert failed.attributes == {"tier": "gold", "error.type": "Boom"}
    assert failed.count == 1


def test_error_type_uses_qualname_and_successes_stay_separate(unique, series_of, one_series):
    name = unique()

    @meterage.meter(name, sample=1.0)
    def maybe(kind):
        if kind == "nested":
            raise Outer.Nested()
        if kind == "value":
            raise ValueError(kind)
        return kind

    for kind in ["ok", "nested", "value", "ok", "value", "ok"]:
        try:
            maybe(kind)
        except (Outer.Nested, ValueError):
            pass
    by_attributes = {tuple(sorted(s.attributes.items())): s.count for s in series_of(name)}
    assert by_attributes == {
        (): 3,
        (("error.type", "Outer.Nested"),): 1,
        (("error.type", "ValueError"),): 2,
    }
    # Failed calls are timed and probed like any other.
    failed = one_series(name, {"error.type": "ValueError"})
    assert failed.histograms["duration"].count == 2
    assert failed.sampled == 2


def test_base_exceptions_are_recorded_and_propagate(unique, one_series):
    name = unique()

    @meterage.meter(name)
    def leave(code):
        sys.exit(code)

    with pytest.raises(SystemExit) as info:
        leave(3)
    assert info.value.code == 3
    assert one_series(name, {"error.type": "SystemExit"}).count == 1


def test_formatted_traceback_matches_the_unmetered_one(unique):
    def fail():
        raise Boom("x")

    metered = meterage.meter(unique())(fail)
    plain = "".join(traceback.format_exception(_catch(fail)))
    wrapped = "".join(traceback.format_exception(_catch(metered)))
    assert wrapped == plain
    assert 'raise Boom("x")' in wrapped


# ---- the context manager --------------------------------------------------------------------


def test_context_manager_with_dynamic_attributes(unique, one_series):
    name = unique("db.query")
    with meterage.meter(name) as call:
        assert isinstance(call, meterage.Call)
        assert call.operation == name
        call.set_attribute("rows", 3)
        assert call.attributes == {"rows": 3}
    series = one_series(name)
    assert series.attributes == {"rows": 3}
    assert series.count == 1
    assert series.histograms["duration"].count == 1


def test_context_manager_static_and_dynamic_attributes_merge(unique, series_of):
    name = unique()
    db_query = meterage.meter(name, attributes={"db": "orders", "rows": 0})
    with db_query as call:
        call.set_attributes({"rows": 5, "cached": False})
        # A dynamic attribute replaces a static one of the same key.
        assert call.attributes == {"db": "orders", "rows": 5, "cached": False}
    with db_query as call:
        call.set_attribute("rows", 5)
        call.set_attribute("cached", False)
    with db_query:
        pass
    counts = {tuple(sorted(s.attributes.items())): s.count for s in series_of(name)}
    assert counts == {
        (("cached", False), ("db", "orders"), ("rows", 5)): 2,
        (("db", "orders"), ("rows", 0)): 1,
    }


def test_last_value_of_a_dynamic_attribute_wins(unique, one_series):
    name = unique()
    with meterage.meter(name) as call:
        call.set_attribute("stage", "parse")
        call.set_attribute("stage", "execute")
    assert one_series(name).attributes == {"stage": "execute"}


def test_context_manager_error_propagates_and_is_recorded(unique, one_series):
    name = unique()
    error = Boom("in block")
    with pytest.raises(Boom) as info:
        with meterage.meter(name, attributes={"db": "x"}) as call:
            call.set_attribute("rows", 4)
            raise error
    assert info.value is error
    series = one_series(name, {"db": "x", "rows": 4, "error.type": "Boom"})
    assert series.count == 1
    assert len([s for s in meterage.snapshot() if s.operation == name]) == 1


def test_context_manager_does_not_swallow_exceptions(unique):
    m = meterage.meter(unique())
    assert m.__enter__() is not None
    # __exit__ returns a falsy value: the exception is not suppressed.
    assert not m.__exit__(Boom, Boom(), None)


def test_nested_blocks_of_one_meter_each_record(unique, series_of):
    name = unique()
    m = meterage.meter(name)
    with m as outer:
        outer.set_attribute("level", "outer")
        with m as inner:
            inner.set_attribute("level", "inner")
            assert inner is not outer
        # The outer call is still the active one after the inner block.
        outer.set_attribute("done", True)
    counts = {tuple(sorted(s.attributes.items())): s.count for s in series_of(name)}
    assert counts == {(("level", "inner"),): 1, (("done", True), ("level", "outer")): 1}


def test_exit_without_enter_is_an_error(unique):
    m = meterage.meter(unique())
    with pytest.raises(RuntimeError, match="without a matching __enter__"):
        m.__exit__(None, None, None)


def test_a_meter_is_reusable_as_decorator_and_block(unique, one_series):
    name = unique()
    m = meterage.meter(name)

    @m
    def f():
        return 1

    assert f() == 1
    with m:
        pass
    assert one_series(name).count == 2


def test_async_with(unique, one_series):
    name = unique()
    m = meterage.meter(name)

    async def main():
        async with m as call:
            call.set_attribute("async", True)
            await asyncio.sleep(0)
        with pytest.raises(Boom):
            async with m:
                raise Boom()

    asyncio.run(main())
    assert one_series(name, {"async": True}).count == 1
    assert one_series(name, {"error.type": "Boom"}).count == 1


def test_reset_clears_everything_and_meters_keep_working(unique, one_series):
    name = unique()
    f = meterage.meter(name)(lambda: None)
    histogram = meterage.histogram(unique("h"))
    counter = meterage.counter(unique("c"))
    f()
    histogram.record(1)
    counter.add(2)
    assert len(meterage.snapshot()) == 3
    meterage.reset()
    assert meterage.snapshot() == []
    assert histogram.snapshot().count == 0
    assert counter.value() == 0.0
    f()
    assert one_series(name).count == 1


# ---- what the wrapper binds, cycles, re-entrancy --------------------------------------------


def test_non_function_callables_do_not_bind_self_when_stored_on_a_class(unique):
    class Adder:
        def __call__(self, *args):
            return args

    class Tools:
        # Builtins, partials and callable objects do not bind as methods; neither may
        # their metered wrappers.
        compress = meterage.meter(unique("compress"))(zlib.compress)
        raw = meterage.meter(unique("raw"))(Adder())
        powers = meterage.meter(unique("pow"))(functools.partial(pow, 2))

    tools = Tools()
    assert zlib.decompress(tools.compress(b"abc")) == b"abc"
    assert tools.raw(1) == (1,)
    with partial_binding_warning():  # Python 3.13's own, for the partial as for its wrapper
        assert tools.powers(3) == 8


def partial_binding_warning() -> contextlib.AbstractContextManager[object]:
    """Python 3.13 warns that partials stored on a class will bind in a later version: the
    metered partial binds as the partial does, warning included."""
    if sys.version_info[:2] == (3, 13):
        return pytest.warns(FutureWarning, match="functools.partial will be a method")
    return contextlib.nullcontext()


# A full collection's CPU time depends on the whole heap, not on the test: its costs are
# reported, not gated against a --meterage-compare baseline (CI's gate saw 11.9 -> 24.4 ms).
@pytest.mark.meterage_costs(gate=False)
def test_an_abandoned_generator_in_a_cycle_is_collected_and_recorded(unique, one_series):
    name = unique()

    class Reader:
        @meterage.meter(name, probes=())
        def rows(self):
            yield 1
            yield 2

    reader = Reader()
    reader.pending = reader.rows()  # object -> generator -> frame -> object
    assert next(reader.pending) == 1
    alive = weakref.ref(reader)
    del reader
    gc.collect()
    assert alive() is None
    # Collected means closed: one call, ended early, not an error.
    series = one_series(name)
    assert series.count == 1
    assert "error.type" not in series.attributes


# A full collection again: reported, not gated.
@pytest.mark.meterage_costs(gate=False)
def test_closing_a_generator_that_never_started_records_nothing(unique, series_of):
    name = unique()

    @meterage.meter(name)
    def rows():
        yield 1

    rows().close()
    unused = rows()
    del unused
    gc.collect()
    assert series_of(name) == []


def test_updating_a_call_from_inside_its_own_update_raises_instead_of_aborting(unique):
    meter = meterage.meter(unique())

    class Sneaky(dict):
        def items(self):
            block_call(None, None, None)  # the block's own exit, re-entering the update
            return super().items()

    with pytest.raises(RuntimeError, match="already being updated"):
        with meter as call:
            block_call = call
            call.set_attributes(types.MappingProxyType(Sneaky(a=1)))
