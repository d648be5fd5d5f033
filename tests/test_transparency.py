"""A metered callable behaves exactly as the callable does without meterage: binding,
kind, introspection, arguments, return values, exceptions and the generator protocols.
Self-contained: no fixture of tests/conftest.py is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import inspect
import sys
import time
import types
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

import meterage


def series(operation: str) -> list[meterage.Series]:
    return [s for s in meterage.snapshot() if s.operation == operation]


def counts(operation: str) -> dict[tuple[tuple[str, Any], ...], int]:
    """Each series of ``operation`` (its attributes, sorted) -> its count."""
    return {tuple(sorted(s.attributes.items())): s.count for s in series(operation)}


def one(operation: str) -> meterage.Series:
    found = series(operation)
    assert len(found) == 1, [s.attributes for s in found]
    return found[0]


# --- 1. Descriptors keep their binding ----------------------------------------------------


def test_metering_an_lru_cache_method_keeps_binding_and_cache(
    unique: Callable[[str], str],
) -> None:
    operation = unique("lru")

    class Squares:
        @meterage.meter(operation)
        @functools.cache  # noqa: B019 (a cached method is what is tested)
        def square(self, x: int) -> int:
            return x * x

    squares = Squares()
    assert squares.square(3) == 9
    assert squares.square(3) == 9
    assert Squares.square(squares, 3) == 9
    assert squares.square(4) == 16
    info = Squares.square.__wrapped__.cache_info()
    assert (info.hits, info.misses) == (2, 2)
    assert counts(operation) == {(): 4}


def test_lru_cache_methods_stay_reachable_through_the_metered_wrapper(
    unique: Callable[[str], str],
) -> None:
    class Squares:
        @meterage.meter(unique("lru"))
        @functools.cache  # noqa: B019 (a cached method is what is tested)
        def square(self, x: int) -> int:
            return x * x

    squares = Squares()
    squares.square(2)
    squares.square(2)
    assert Squares.square.cache_info().hits == 1
    assert squares.square.cache_info().hits == 1
    Squares.square.cache_clear()
    assert Squares.square.cache_info().currsize == 0


def test_metering_an_already_metered_method_keeps_binding(
    unique: Callable[[str], str],
) -> None:
    outer, inner = unique("outer"), unique("inner")

    class Service:
        @meterage.meter(outer)
        @meterage.meter(inner)
        def handle(self, x: int) -> tuple[Any, int]:
            return self, x

    service = Service()
    assert service.handle(1) == (service, 1)
    assert Service.handle(service, 2) == (service, 2)
    assert counts(outer) == {(): 2}
    assert counts(inner) == {(): 2}


class _Bound:
    """Methods bound through a descriptor under the meter (not a plain function)."""

    def plain(self, x: int) -> int:
        return x

    @functools.cache  # noqa: B019 (a cached method is what is tested)
    def cached(self, x: int) -> int:
        return x

    @meterage.meter("transparency.bound.outer")
    @meterage.meter("transparency.bound.inner")
    def nested(self, x: int) -> int:
        return x

    metered_cached = meterage.meter("transparency.bound.cached")(cached)


@pytest.mark.parametrize("name", ["metered_cached", "nested"])
def test_a_method_bound_through_a_descriptor_is_a_bound_method(name: str) -> None:
    owner = _Bound()
    bound = getattr(owner, name)
    assert getattr(owner, name)(7) == 7
    assert bound.__self__ is owner
    assert bound == getattr(owner, name)
    callbacks = [bound]
    callbacks.remove(getattr(owner, name))
    assert weakref.WeakMethod(getattr(owner, name))() == bound


@pytest.mark.parametrize("name", ["metered_cached", "nested"])
def test_the_signature_of_a_method_bound_through_a_descriptor_drops_self(name: str) -> None:
    owner = _Bound()
    expected = inspect.signature(owner.plain)
    assert list(expected.parameters) == ["x"]
    assert inspect.signature(owner.cached) == expected
    assert inspect.signature(getattr(owner, name)) == expected


def test_metering_method_descriptors_keeps_binding(unique: Callable[[str], str]) -> None:
    shout, from_keys, represent = unique("shout"), unique("fromkeys"), unique("repr")

    class Loud(str):
        upper = meterage.meter(shout)(str.upper)  # method_descriptor

    class Table(dict):  # type: ignore[type-arg]
        make = meterage.meter(from_keys)(dict.__dict__["fromkeys"])  # classmethod_descriptor

    class Plain:
        show = meterage.meter(represent)(object.__repr__)  # wrapper_descriptor

    assert Loud("a").upper() == "A"
    assert Loud.upper(Loud("b")) == "B"
    made = Table.make([1, 2])
    assert type(made) is Table and made == {1: None, 2: None}
    assert type(Table().make([3])) is Table
    plain = Plain()
    assert plain.show() == object.__repr__(plain)
    assert counts(shout) == {(): 2}
    assert counts(from_keys) == {(): 2}
    assert counts(represent) == {(): 1}


def test_classmethod_and_staticmethod_in_both_orders(unique: Callable[[str], str]) -> None:
    names = {label: unique(label) for label in ("cm_out", "cm_in", "sm_out", "sm_in")}

    class Kind:
        @meterage.meter(names["cm_out"])
        @classmethod
        def meter_over_classmethod(cls, x: int) -> tuple[type, int]:
            return cls, x

        @classmethod  # type: ignore[misc]
        @meterage.meter(names["cm_in"])
        def classmethod_over_meter(cls, x: int) -> tuple[type, int]:
            return cls, x

        @meterage.meter(names["sm_out"])
        @staticmethod
        def meter_over_staticmethod(x: int) -> int:
            return x

        @staticmethod
        @meterage.meter(names["sm_in"])
        def staticmethod_over_meter(x: int) -> int:
            return x

    class Sub(Kind):
        pass

    for method in ("meter_over_classmethod", "classmethod_over_meter"):
        assert getattr(Kind, method)(1) == (Kind, 1)
        assert getattr(Kind(), method)(2) == (Kind, 2)
        assert getattr(Sub, method)(3) == (Sub, 3)
    for method in ("meter_over_staticmethod", "staticmethod_over_meter"):
        assert getattr(Kind, method)(1) == 1
        assert getattr(Kind(), method)(2) == 2
    assert {label: counts(name) for label, name in names.items()} == {
        "cm_out": {(): 3},
        "cm_in": {(): 3},
        "sm_out": {(): 2},
        "sm_in": {(): 2},
    }


def test_a_callable_that_is_not_a_descriptor_stays_unbound(
    unique: Callable[[str], str],
) -> None:
    operation = unique("partial")

    class Holder:
        add_one = meterage.meter(operation)(functools.partial(lambda a, b: a + b, 1))

    # Python 3.13 warns that partials stored on a class will bind in a later version: the
    # metered partial binds as the partial does, warning included.
    expected = (
        pytest.warns(FutureWarning, match="functools.partial will be a method")
        if sys.version_info[:2] == (3, 13)
        else contextlib.nullcontext()
    )
    with expected:
        assert Holder().add_one(2) == 3  # no self passed, as without meterage
    assert Holder.add_one(3) == 4
    assert counts(operation) == {(): 2}


# --- 2. Metered twice under one operation: each call counted once -------------------------


def test_metering_twice_under_one_name_counts_each_call_once(
    unique: Callable[[str], str],
) -> None:
    plain, with_attributes, method = unique("plain"), unique("attrs"), unique("method")

    def function(x: int) -> int:
        return x

    twice = meterage.meter(plain)(meterage.meter(plain)(function))
    assert twice.__wrapped__ is function
    attributes = {"tier": "gold"}
    twice_attributed = meterage.meter(with_attributes, attributes=attributes)(
        meterage.meter(with_attributes, attributes=attributes)(function)
    )

    class Service:
        @meterage.meter(method)
        @meterage.meter(method)
        def handle(self) -> Service:
            return self

    assert [twice(1), twice(2), twice_attributed(3)] == [1, 2, 3]
    service = Service()
    assert service.handle() is service
    assert counts(plain) == {(): 2}
    assert counts(with_attributes) == {(("tier", "gold"),): 1}
    assert counts(method) == {(): 1}


def test_metering_twice_under_one_name_counts_coroutines_and_generators_once(
    unique: Callable[[str], str],
) -> None:
    coroutine_name, generator_name = unique("coroutine"), unique("generator")

    async def coroutine(x: int) -> int:
        return x

    def generator(x: int) -> Iterator[int]:
        yield x

    twice_coroutine = meterage.meter(coroutine_name)(meterage.meter(coroutine_name)(coroutine))
    twice_generator = meterage.meter(generator_name)(meterage.meter(generator_name)(generator))
    assert asyncio.run(twice_coroutine(5)) == 5
    assert list(twice_generator(6)) == [6]
    assert counts(coroutine_name) == {(): 1}
    assert counts(generator_name) == {(): 1}


def test_metering_twice_under_other_attributes_counts_in_both(
    unique: Callable[[str], str],
) -> None:
    operation = unique("both")
    both = meterage.meter(operation, attributes={"layer": "outer"})(
        meterage.meter(operation, attributes={"layer": "inner"})(lambda: 1)
    )
    assert both() == 1
    assert counts(operation) == {(("layer", "inner"),): 1, (("layer", "outer"),): 1}


# --- 3. @types.coroutine generators stay awaitable ----------------------------------------


def test_a_metered_types_coroutine_stays_awaitable_and_is_metered(
    unique: Callable[[str], str],
) -> None:
    operation = unique("legacy")

    @meterage.meter(operation)
    @types.coroutine
    def legacy(seconds: float) -> Iterator[Any]:
        yield from asyncio.sleep(seconds).__await__()
        return "slept"

    async def main() -> str:
        return await legacy(0.1)  # type: ignore[no-any-return]

    assert asyncio.run(main()) == "slept"
    found = one(operation)
    assert found.count == 1
    assert 0.09 <= found.histograms["duration"].sum < 2.0


# --- 4. Wrong arguments raise at the call -------------------------------------------------


def _generator(a: int) -> Iterator[int]:
    yield a


async def _coroutine(a: int) -> int:
    return a


async def _async_generator(a: int) -> AsyncIterator[int]:
    yield a


class _Methods:
    def generator(self, a: int) -> Iterator[int]:
        yield a

    async def coroutine(self, a: int) -> int:
        return a

    async def async_generator(self, a: int) -> AsyncIterator[int]:
        yield a


@pytest.mark.parametrize(
    "function",
    [
        _generator,
        _coroutine,
        _async_generator,
        _Methods.generator,
        _Methods.coroutine,
        _Methods.async_generator,
    ],
    ids=lambda f: f.__qualname__,
)
def test_wrong_arguments_raise_type_error_at_the_call(
    function: Callable[..., Any], unique: Callable[[str], str]
) -> None:
    metered = meterage.meter(unique("wrong"))(function)
    expected = "missing 1 required positional argument: 'a'"
    if function.__qualname__.startswith("_Methods."):

        class Host:
            call = metered

        with pytest.raises(TypeError, match=expected):
            Host().call()
        with pytest.raises(TypeError, match="got an unexpected keyword argument 'b'"):
            Host().call(1, b=2)
    else:
        with pytest.raises(TypeError, match=expected):
            metered()
        with pytest.raises(TypeError, match="got an unexpected keyword argument 'b'"):
            metered(1, b=2)


# --- 5. Callables that return coroutines (or other awaitables) ----------------------------


def _awaited_duration(operation: str) -> float:
    found = one(operation)
    assert found.count == 1
    return found.histograms["duration"].sum


def test_an_object_with_async_call_is_metered_for_the_awaited_work(
    unique: Callable[[str], str],
) -> None:
    operation = unique("async_call")

    class Handler:
        async def __call__(self, seconds: float) -> str:
            await asyncio.sleep(seconds)
            return "handled"

    handler = meterage.meter(operation)(Handler())
    assert asyncio.run(handler(0.2)) == "handled"
    assert 0.19 <= _awaited_duration(operation) < 2.0


def test_an_async_def_behind_a_plain_decorator_is_metered_for_the_awaited_work(
    unique: Callable[[str], str],
) -> None:
    operation = unique("behind")

    def plain_decorator(function: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any) -> Any:  # no functools.wraps: not a coroutine function
            return function(*args)

        return forward

    @meterage.meter(operation)
    @plain_decorator
    async def handler(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "handled"

    assert not inspect.iscoroutinefunction(handler)
    assert asyncio.run(handler(0.2)) == "handled"
    assert 0.19 <= _awaited_duration(operation) < 2.0


def test_a_partial_of_an_async_def_is_metered_for_the_awaited_work(
    unique: Callable[[str], str],
) -> None:
    operation = unique("partial")

    async def handler(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    metered = meterage.meter(operation)(functools.partial(handler, 0.2))
    assert asyncio.run(metered()) == 0.2
    assert 0.19 <= _awaited_duration(operation) < 2.0


def test_a_callable_returning_a_future_warns_once_naming_the_operation(
    unique: Callable[[str], str],
) -> None:
    operation = unique("future")

    @meterage.meter(operation)
    def ready(value: int) -> asyncio.Future[int]:
        future = asyncio.get_running_loop().create_future()
        future.set_result(value)
        return future

    async def main() -> list[int]:
        return [await ready(1), await ready(2)]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert asyncio.run(main()) == [1, 2]
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    assert operation in str(runtime[0].message)
    assert "Future" in str(runtime[0].message)
    assert counts(operation) == {(): 2}


# --- 6. Settings without a name -----------------------------------------------------------


def test_settings_without_a_name_name_the_operation_after_the_qualname() -> None:
    @meterage.meter(sample=1.0)
    def sampled() -> str:
        return "sampled"

    @meterage.meter(probes=("cpu",))
    def probed() -> str:
        return "probed"

    @meterage.meter(probes=("cpu",), sample=1.0)
    def cpu_only() -> str:
        return "cpu"

    assert (sampled(), probed(), cpu_only()) == ("sampled", "probed", "cpu")
    for function in (sampled, probed, cpu_only):
        assert function.__qualname__.endswith(f"<locals>.{function.__name__}")
        assert counts(function.__qualname__) == {(): 1}
    histograms = one(cpu_only.__qualname__).histograms
    assert sorted(histograms) == ["cpu.time", "duration"]
    assert histograms["cpu.time"].count == 1


def test_settings_without_a_name_are_checked_when_given() -> None:
    with pytest.raises(ValueError, match="sample"):
        meterage.meter(sample=2.0)
    with pytest.raises(TypeError):
        meterage.meter(None)  # type: ignore[call-overload]


# --- 7. Introspection answers as for the function -----------------------------------------


def plain_function(a: int, b: int = 2, *, c: int = 3) -> int:
    """Docstring of plain_function."""
    return a + b + c


async def coroutine_function(a: int, b: int = 2, *, c: int = 3) -> int:
    """Docstring of coroutine_function."""
    return a + b + c


def generator_function(a: int, b: int = 2, *, c: int = 3) -> Iterator[int]:
    """Docstring of generator_function."""
    yield a + b + c


async def async_generator_function(a: int, b: int = 2, *, c: int = 3) -> AsyncIterator[int]:
    """Docstring of async_generator_function."""
    yield a + b + c


FUNCTIONS = [plain_function, coroutine_function, generator_function, async_generator_function]

INTROSPECTION: dict[str, Callable[[Any], Any]] = {
    "inspect.iscoroutinefunction": inspect.iscoroutinefunction,
    "inspect.isgeneratorfunction": inspect.isgeneratorfunction,
    "inspect.isasyncgenfunction": inspect.isasyncgenfunction,
    "asyncio.iscoroutinefunction": asyncio.iscoroutinefunction,
    "inspect.signature": lambda f: str(inspect.signature(f)),
    "__name__": lambda f: f.__name__,
    "__qualname__": lambda f: f.__qualname__,
    "__doc__": lambda f: f.__doc__,
    "__module__": lambda f: f.__module__,
}


def _introspect(function: Any) -> dict[str, Any]:
    return {name: look(function) for name, look in INTROSPECTION.items()}


@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda f: f.__name__)
def test_introspection_of_a_metered_function(function: Callable[..., Any]) -> None:
    metered = meterage.meter(function)
    assert _introspect(metered) == _introspect(function)
    assert metered.__wrapped__ is function


class Methods:
    def plain(self, a: int, b: int = 2) -> int:
        """Docstring of plain."""
        return a + b

    async def coroutine(self, a: int, b: int = 2) -> int:
        """Docstring of coroutine."""
        return a + b

    def generator(self, a: int, b: int = 2) -> Iterator[int]:
        """Docstring of generator."""
        yield a + b

    async def async_generator(self, a: int, b: int = 2) -> AsyncIterator[int]:
        """Docstring of async_generator."""
        yield a + b

    metered_plain = meterage.meter(plain)
    metered_coroutine = meterage.meter(coroutine)
    metered_generator = meterage.meter(generator)
    metered_async_generator = meterage.meter(async_generator)


@pytest.mark.parametrize("name", ["plain", "coroutine", "generator", "async_generator"])
@pytest.mark.parametrize("through", ["class", "instance"])
def test_introspection_of_a_metered_method(name: str, through: str) -> None:
    owner: Any = Methods if through == "class" else Methods()
    assert _introspect(getattr(owner, f"metered_{name}")) == _introspect(getattr(owner, name))


def test_a_metered_coroutine_function_makes_a_coroutine() -> None:
    metered = meterage.meter(coroutine_function)
    coroutine = metered(1)
    assert asyncio.iscoroutine(coroutine)
    assert inspect.iscoroutine(coroutine)
    assert asyncio.run(coroutine) == 6


def test_a_metered_generator_function_makes_a_generator() -> None:
    generator = meterage.meter(generator_function)(1)
    assert inspect.isgenerator(generator)
    assert isinstance(generator, types.GeneratorType)
    assert list(generator) == [6]


def test_a_metered_async_generator_function_makes_an_async_generator() -> None:
    agen = meterage.meter(async_generator_function)(1)
    assert inspect.isasyncgen(agen)

    async def main() -> list[int]:
        return [value async for value in agen]

    assert asyncio.run(main()) == [6]


@pytest.mark.parametrize(
    "function",
    [coroutine_function, generator_function, async_generator_function],
    ids=lambda f: f.__name__,
)
def test_the_object_a_metered_function_makes_carries_its_name(
    function: Callable[..., Any],
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "never awaited", checked below
        made = meterage.meter(function)(1)
        try:
            assert made.__name__ == function.__name__
            assert made.__qualname__ == function.__qualname__
            assert f" {function.__qualname__} at 0x" in repr(made)
        finally:
            if hasattr(made, "close"):  # an unstarted async generator needs no closing
                made.close()
            del made
            gc.collect()


def test_a_never_awaited_metered_coroutine_warns_with_its_own_name() -> None:
    @meterage.meter
    async def forgotten() -> None:
        pass

    messages = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coroutine = forgotten()
        del coroutine
        gc.collect()
        # A recorded warning keeps its source (the coroutine) alive: drop it and collect
        # again, so that any later warning is seen here too.
        for _ in range(2):
            messages += [str(w.message) for w in caught if w.category is RuntimeWarning]
            caught.clear()
            gc.collect()
    assert messages == [f"coroutine '{forgotten.__qualname__}' was never awaited"]


def _unawaited_warnings(run: Callable[[], None]) -> list[str]:
    messages = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
        for _ in range(2):
            gc.collect()
            messages += [str(w.message) for w in caught if w.category is RuntimeWarning]
            caught.clear()
    return messages


@pytest.mark.parametrize("how", ["close", "cancel_task"])
def test_a_metered_coroutine_closed_before_it_started_does_not_warn(
    how: str, unique: Callable[[str], str]
) -> None:
    async def work() -> int:
        return 1

    metered = meterage.meter(unique("closed"))(work)

    def close_unstarted(function: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            if how == "close":
                function().close()
                return

            async def main() -> None:
                task = asyncio.get_running_loop().create_task(function())
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

            asyncio.run(main())

        return run

    assert _unawaited_warnings(close_unstarted(work)) == []
    assert _unawaited_warnings(close_unstarted(metered)) == []


# --- 8. Values, exceptions and the generator protocols, side by side ----------------------


class Boom(Exception):
    pass


def _conversation(x: int) -> Iterator[Any]:
    log: list[Any] = []
    try:
        got = yield x
        log.append(got)
        while True:
            try:
                got = yield ("got", got)
                if got == "return":
                    return ("done", tuple(log))
                if isinstance(got, BaseException):
                    raise got
                if got == "ignore exit":
                    try:
                        yield "first"
                    except GeneratorExit:
                        yield "ignored"
            except KeyError as error:
                got = ("caught", error.args)
    finally:
        log.append("finally")


def _outcome(run: Callable[[], Any], state: Callable[[], str] | None, sent: Any = None) -> Any:
    try:
        value = run()
    except StopIteration as stop:
        result: tuple[Any, ...] = ("return", stop.value)
    except StopAsyncIteration:
        result = ("stop async",)
    except BaseException as error:
        result = ("raise", type(error).__name__, error.args, error is sent)
    else:
        result = ("value", value)
    return result + ((state(),) if state is not None else ())


def _step(target: Any, operation: str, argument: Any) -> Any:
    """One protocol operation on a generator, coroutine or async generator."""
    if operation == "next":
        return target.__anext__() if inspect.isasyncgen(target) else next(target)
    if operation == "close":
        return target.close()
    if operation == "aclose":
        return target.aclose()
    return getattr(target, operation)(argument)  # send, throw, asend, athrow


# Each script step: (operation, argument factory). Factories make fresh exceptions per
# run so that identity (`error is sent`) can be compared.
GENERATOR_SCRIPTS: dict[str, list[tuple[str, Callable[[], Any] | None]]] = {
    "send and return": [
        ("next", None),
        ("send", lambda: 1),
        ("send", lambda: 2),
        ("send", lambda: "return"),
        ("next", None),
    ],
    "return a tuple": [("next", None), ("send", lambda: "x"), ("send", lambda: "return")],
    "throw caught": [("next", None), ("next", None), ("throw", lambda: KeyError("k"))],
    "throw uncaught": [("next", None), ("throw", lambda: ValueError("v")), ("next", None)],
    "raise from inside": [
        ("next", None),
        ("send", lambda: 1),
        ("send", lambda: Boom("inside")),
        ("next", None),
    ],
    "close suspended": [("next", None), ("close", None), ("next", None), ("close", None)],
    "close unstarted": [("close", None), ("next", None)],
    "throw unstarted": [("throw", lambda: ValueError("early")), ("next", None)],
    "send to unstarted": [("send", lambda: 5)],
    "throw GeneratorExit": [("next", None), ("throw", GeneratorExit), ("next", None)],
}


def _run_generator_script(
    generator: Any, script: list[tuple[str, Callable[[], Any] | None]]
) -> list[Any]:
    transcript = []
    for operation, make in script:
        argument = make() if make is not None else None
        run = functools.partial(_step, generator, operation, argument)
        transcript.append(
            _outcome(run, lambda: inspect.getgeneratorstate(generator), sent=argument)
        )
    return transcript


@pytest.mark.parametrize("script", list(GENERATOR_SCRIPTS))
def test_a_metered_generator_behaves_as_the_generator(
    script: str, unique: Callable[[str], str]
) -> None:
    metered = meterage.meter(unique("generator"))(_conversation)
    steps = GENERATOR_SCRIPTS[script]
    plain_transcript = _run_generator_script(_conversation(0), steps)
    assert _run_generator_script(metered(0), steps) == plain_transcript


#: Scripts in which the generator ignores close() (it yields on GeneratorExit, so close()
#: raises RuntimeError and the generator stays suspended and resumable), with the calls
#: then recorded: (script, {error.type or None: count}).
IGNORED_CLOSE_SCRIPTS: dict[str, tuple[list[tuple[str, Callable[[], Any] | None]], Any]] = {
    "resumed, then returns": (
        [
            ("next", None),
            ("send", lambda: 1),
            ("send", lambda: "ignore exit"),
            ("close", None),  # RuntimeError: generator ignored GeneratorExit
            ("next", None),
            ("send", lambda: "return"),
        ],
        {None: 1},
    ),
    "ignored twice, then closed": (
        [
            ("next", None),
            ("send", lambda: 1),
            ("send", lambda: "ignore exit"),
            ("close", None),
            ("next", None),
            ("send", lambda: 1),
            ("send", lambda: "ignore exit"),
            ("close", None),
            ("close", None),
            ("next", None),
        ],
        {None: 1},
    ),
    "thrown into, caught": (
        [
            ("next", None),
            ("send", lambda: 1),
            ("send", lambda: "ignore exit"),
            ("close", None),
            ("throw", lambda: KeyError("k")),
            ("send", lambda: "return"),
        ],
        {None: 1},
    ),
    "thrown into, raises": (
        [
            ("next", None),
            ("send", lambda: 1),
            ("send", lambda: "ignore exit"),
            ("close", None),
            ("throw", lambda: ValueError("v")),
            ("next", None),
        ],
        {"ValueError": 1},
    ),
    "still open": (
        [("next", None), ("send", lambda: 1), ("send", lambda: "ignore exit"), ("close", None)],
        {},
    ),
}


@pytest.mark.parametrize("script", list(IGNORED_CLOSE_SCRIPTS))
def test_a_metered_generator_that_ignores_generator_exit_behaves_as_the_generator(
    script: str, unique: Callable[[str], str]
) -> None:
    steps, recorded = IGNORED_CLOSE_SCRIPTS[script]
    name = unique("stubborn")
    metered = meterage.meter(name)(_conversation)
    plain_transcript = _run_generator_script(_conversation(0), steps)
    ignored = plain_transcript[steps.index(("close", None))]
    assert ignored[:3] == ("raise", "RuntimeError", ("generator ignored GeneratorExit",))
    assert ignored[-1] == "GEN_SUSPENDED"
    generator = metered(0)
    assert _run_generator_script(generator, steps) == plain_transcript
    # One call, ended when the generator ended (not at the close it ignored).
    assert counts(name) == {
        (() if error is None else (("error.type", error),)): count
        for error, count in recorded.items()
    }


async def _stubborn_coroutine() -> str:
    try:
        await _Suspend("first")
    except GeneratorExit:
        await _Suspend("ignored")
    await _Suspend("after")
    return "done"


class _Suspend:
    def __init__(self, value: str) -> None:
        self.value = value

    def __await__(self) -> Iterator[str]:
        yield self.value


def test_a_metered_coroutine_that_ignores_generator_exit_behaves_as_the_coroutine(
    unique: Callable[[str], str],
) -> None:
    name = unique("stubborn_coroutine")
    metered = meterage.meter(name)(_stubborn_coroutine)

    def transcript(coroutine: Any) -> list[Any]:
        state = functools.partial(inspect.getcoroutinestate, coroutine)
        return [
            _outcome(functools.partial(coroutine.send, None), state),
            _outcome(coroutine.close, state),
            _outcome(functools.partial(coroutine.send, None), state),
            _outcome(functools.partial(coroutine.send, None), state),
        ]

    plain = transcript(_stubborn_coroutine())
    assert plain == [
        ("value", "first", "CORO_SUSPENDED"),
        ("raise", "RuntimeError", ("coroutine ignored GeneratorExit",), False, "CORO_SUSPENDED"),
        ("value", "after", "CORO_SUSPENDED"),
        ("return", "done", "CORO_CLOSED"),
    ]
    assert transcript(metered()) == plain
    assert counts(name) == {(): 1}


async def _stubborn_async_generator() -> AsyncIterator[str]:
    try:
        yield "first"
    except GeneratorExit:
        yield "ignored"
    yield "after"


def test_a_metered_async_generator_that_ignores_generator_exit_behaves_as_the_generator(
    unique: Callable[[str], str],
) -> None:
    name = unique("stubborn_async_generator")
    metered = meterage.meter(name)(_stubborn_async_generator)

    async def transcript(generator: Any) -> list[Any]:
        outcomes = []
        for operation in ("next", "aclose", "next", "next"):
            try:
                outcomes.append(("value", await _step(generator, operation, None)))
            except BaseException as error:
                outcomes.append(("raise", type(error).__name__, error.args))
        return outcomes

    plain = asyncio.run(transcript(_stubborn_async_generator()))
    assert plain == [
        ("value", "first"),
        ("raise", "RuntimeError", ("async generator ignored GeneratorExit",)),
        ("value", "after"),
        ("raise", "StopAsyncIteration", ()),
    ]
    assert asyncio.run(transcript(metered())) == plain
    assert counts(name) == {(): 1}


def test_a_metered_generator_reentered_raises_as_the_generator(
    unique: Callable[[str], str],
) -> None:
    def reenter() -> Iterator[Any]:
        try:
            next(holder[0])
        except ValueError as error:
            yield ("ValueError", str(error))

    holder: list[Any] = [reenter()]
    plain = list(holder[0])
    holder[0] = meterage.meter(unique("reenter"))(reenter)()
    assert list(holder[0]) == plain == [("ValueError", "generator already executing")]


def test_a_metered_generator_delegated_to_returns_its_value(
    unique: Callable[[str], str],
) -> None:
    metered = meterage.meter(unique("delegate"))(_conversation)

    def delegate(function: Callable[[int], Iterator[Any]]) -> Iterator[Any]:
        result = yield from function(0)
        yield ("result", result)

    for function in (_conversation, metered):
        outer = delegate(function)
        assert [next(outer), outer.send(1), outer.send("return")] == [
            0,
            ("got", 1),
            ("result", ("done", (1,))),
        ]


class _Pause:
    """An awaitable that yields twice to whoever drives the coroutine."""

    def __await__(self) -> Iterator[Any]:
        got = yield "paused"
        again = yield ("paused again", got)
        return ("resumed", got, again)


async def _awaiting(x: int) -> Any:
    try:
        result = await _Pause()
    except KeyError as error:
        return ("caught", error.args)
    if result[2] == "fail":
        raise Boom("after resume")
    return result, x


COROUTINE_SCRIPTS: dict[str, list[tuple[str, Callable[[], Any] | None]]] = {
    "send and return": [("send", None), ("send", lambda: 1), ("send", lambda: 2)],
    "raise after resume": [("send", None), ("send", lambda: 1), ("send", lambda: "fail")],
    "throw caught": [("send", None), ("throw", lambda: KeyError("k"))],
    "throw uncaught": [("send", None), ("throw", lambda: ValueError("v")), ("send", None)],
    "close suspended": [("send", None), ("close", None), ("send", None)],
    "close unstarted": [("close", None), ("send", None)],
    "send to unstarted": [("send", lambda: 5)],
    "reuse": [("send", None), ("send", lambda: 1), ("send", lambda: 2), ("send", None)],
}


def _run_coroutine_script(
    coroutine: Any, script: list[tuple[str, Callable[[], Any] | None]]
) -> list[Any]:
    transcript = []
    for operation, make in script:
        argument = make() if make is not None else None
        run = functools.partial(_step, coroutine, operation, argument)
        transcript.append(
            _outcome(run, lambda: inspect.getcoroutinestate(coroutine), sent=argument)
        )
    return transcript


@pytest.mark.parametrize("script", list(COROUTINE_SCRIPTS))
def test_a_metered_coroutine_behaves_as_the_coroutine(
    script: str, unique: Callable[[str], str]
) -> None:
    metered = meterage.meter(unique("coroutine"))(_awaiting)
    steps = COROUTINE_SCRIPTS[script]
    with warnings.catch_warnings():
        # Scripts that never start the coroutine ("never awaited": tested above).
        warnings.simplefilter("ignore", RuntimeWarning)
        plain_transcript = _run_coroutine_script(_awaiting(0), steps)
        metered_transcript = _run_coroutine_script(metered(0), steps)
        gc.collect()
    assert metered_transcript == plain_transcript


async def _stream(x: int) -> AsyncIterator[Any]:
    try:
        got = yield x
        while True:
            try:
                await asyncio.sleep(0)
                got = yield ("got", got)
                if got == "stop":
                    return
                if isinstance(got, BaseException):
                    raise got
            except KeyError as error:
                got = ("caught", error.args)
    finally:
        await asyncio.sleep(0)


ASYNC_GENERATOR_SCRIPTS: dict[str, list[tuple[str, Callable[[], Any] | None]]] = {
    "asend and stop": [
        ("next", None),
        ("asend", lambda: 1),
        ("asend", lambda: 2),
        ("asend", lambda: "stop"),
        ("next", None),
    ],
    "athrow caught": [
        ("next", None),
        ("asend", lambda: 1),
        ("athrow", lambda: KeyError("k")),
        ("next", None),
    ],
    "athrow uncaught": [("next", None), ("athrow", lambda: ValueError("v")), ("next", None)],
    "raise from inside": [
        ("next", None),
        ("asend", lambda: 1),
        ("asend", lambda: Boom("inside")),
        ("next", None),
    ],
    "aclose suspended": [("next", None), ("aclose", None), ("next", None), ("aclose", None)],
    "aclose unstarted": [("aclose", None), ("next", None)],
    "athrow unstarted": [("athrow", lambda: ValueError("early")), ("next", None)],
    "asend to unstarted": [("asend", lambda: 5)],
    "athrow CancelledError": [
        ("next", None),
        ("athrow", asyncio.CancelledError),
        ("next", None),
    ],
}


async def _run_async_generator_script(
    agen: Any, script: list[tuple[str, Callable[[], Any] | None]]
) -> list[Any]:
    transcript = []
    for operation, make in script:
        argument = make() if make is not None else None
        awaitable = _step(agen, operation, argument)
        try:
            value = await awaitable
        except StopAsyncIteration:
            transcript.append(("stop async",))
        except BaseException as error:
            transcript.append(("raise", type(error).__name__, error.args, error is argument))
        else:
            transcript.append(("value", value))
    return transcript


@pytest.mark.parametrize("script", list(ASYNC_GENERATOR_SCRIPTS))
def test_a_metered_async_generator_behaves_as_the_async_generator(
    script: str, unique: Callable[[str], str]
) -> None:
    metered = meterage.meter(unique("agen"))(_stream)
    steps = ASYNC_GENERATOR_SCRIPTS[script]

    async def both() -> tuple[list[Any], list[Any]]:
        plain = await _run_async_generator_script(_stream(0), steps)
        return plain, await _run_async_generator_script(metered(0), steps)

    plain_transcript, metered_transcript = asyncio.run(both())
    assert metered_transcript == plain_transcript


def test_return_values_and_exceptions_pass_through_unchanged(
    unique: Callable[[str], str],
) -> None:
    value, error = object(), Boom("same object")

    @meterage.meter(unique("give"))
    def give() -> object:
        return value

    @meterage.meter(unique("fail"))
    def fail() -> None:
        raise error

    @meterage.meter(unique("afail"))
    async def afail() -> None:
        await asyncio.sleep(0)
        raise error

    assert give() is value
    with pytest.raises(Boom) as raised:
        fail()
    assert raised.value is error and raised.value.__context__ is None
    with pytest.raises(Boom) as araised:
        asyncio.run(afail())
    assert araised.value is error


def test_a_metered_call_is_timed(unique: Callable[[str], str]) -> None:
    operation = unique("sleep")

    @meterage.meter(operation)
    def nap(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    assert nap(0.05) == 0.05
    assert 0.045 <= one(operation).histograms["duration"].sum < 2.0
