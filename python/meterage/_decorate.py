"""Turning a callable into its metered twin, keeping what kind of callable it is.

Every callable becomes a native vectorcall wrapper. It binds as a method exactly as the
callable does (a function like a function; a descriptor such as an ``lru_cache`` wrapper
through its own ``__get__``; anything else not at all), and it carries the function's
``__code__``, defaults and annotations besides what ``functools.update_wrapper`` copies,
so ``inspect.iscoroutinefunction``, ``isgeneratorfunction`` and ``isasyncgenfunction``
answer as they do for the function.

Calling a coroutine, generator or async generator function only binds its arguments
(so a wrong call raises at the call, as without meterage) and makes the object; the
object is metered step by step, through one of the drivers below, so a call is charged
only for its own steps. The same holds for any callable that returns such an object.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any, TypeVar

from meterage import _native

F = TypeVar("F", bound=Callable[..., Any])

#: Attributes that make a wrapper look like the function to ``inspect``.
_FUNCTION_LIKE = ("__code__", "__defaults__", "__kwdefaults__")


async def _drive_coroutine(steps: Any) -> Any:
    try:
        return await steps
    except RuntimeError:
        if not steps.ignored_close:
            raise
    # The coroutine ignored close(): this driver stays suspended too (see _resume).
    value = None
    while True:
        try:
            sent = await _pause(value)
        except BaseException as thrown:
            ended, value = _resume(steps, None, thrown)
        else:
            ended, value = _resume(steps, sent, None)
        if ended:
            return value


def _drive_generator(steps: Any) -> Generator[Any, Any, Any]:
    try:
        return (yield from steps)
    except RuntimeError:
        if not steps.ignored_close:
            raise
    # The generator ignored close(): this driver stays suspended too (see _resume).
    value = None
    while True:
        try:
            sent = yield value
        except BaseException as thrown:
            ended, value = _resume(steps, None, thrown)
        else:
            ended, value = _resume(steps, sent, None)
        if ended:
            return value


#: A generator-based coroutine's driver: the generator's, flagged as `types.coroutine` does.
_drive_iterable_coroutine = types.coroutine(
    types.FunctionType(_drive_generator.__code__, globals(), "_drive_iterable_coroutine")
)


@types.coroutine
def _pause(value: Any) -> Generator[Any, Any, Any]:
    """Yields ``value`` from the coroutine that awaits it; gives back what is sent."""
    return (yield value)


def _resume(steps: Any, sent: Any, thrown: BaseException | None) -> tuple[bool, Any]:
    """One step of a generator (or coroutine) that ignored ``close()``: it yielded on
    GeneratorExit and stays suspended, and so does its driver, at its own yield, so that
    ``close()`` raises the same RuntimeError from it and what comes next goes on to the
    generator. (A driver in ``yield from`` cannot: a delegate's ignored close ends it.)
    Gives whether the generator ended, and what it yielded or returned."""
    try:
        if thrown is None:
            return False, steps.send(sent)
        if isinstance(thrown, GeneratorExit):  # close(), as `yield from` passes it on
            steps.close()
            raise thrown
        return False, steps.throw(thrown)
    except StopIteration as stop:
        return True, stop.value
    except RuntimeError:
        if not steps.ignored_close:
            raise
        return False, None  # ignored again


async def _drive_async_generator(call: _native.OpenCall, inner: Any) -> AsyncGenerator[Any, Any]:
    # An async generator cannot delegate with `yield from`, so this forwards asend,
    # athrow and aclose by hand, metering each awaitable's steps as part of one call.
    try:
        value = await call.steps(inner.asend(None))
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                try:
                    await call.steps(inner.aclose())
                except RuntimeError:
                    if inner.ag_frame is None:
                        raise
                    # It yielded on GeneratorExit and stays suspended: so does this one
                    # (its aclose() raises the same RuntimeError), and goes on with it.
                    value = None
                    continue
                raise
            except BaseException as thrown:  # forwarded into the generator as is
                value = await call.steps(inner.athrow(thrown))
            else:
                value = await call.steps(inner.asend(sent))
    except StopAsyncIteration:
        call.finish()
    except GeneratorExit:
        call.finish()
        raise
    except BaseException as error:
        call.finish(type(error))
        raise


_native._set_drivers(
    _drive_coroutine, _drive_generator, _drive_iterable_coroutine, _drive_async_generator
)


_DRIVERS = (
    (inspect.CO_ASYNC_GENERATOR, _drive_async_generator),
    (inspect.CO_COROUTINE, _drive_coroutine),
    (inspect.CO_ITERABLE_COROUTINE, _drive_iterable_coroutine),
    (inspect.CO_GENERATOR, _drive_generator),
)


def _driver_for(function: Any) -> Any:
    """For a coroutine, generator or async generator function: a copy of the driver of its
    kind named like it, so the objects it makes carry its name (in reprs, in "never
    awaited" warnings); None for anything else."""
    if type(function) is not types.FunctionType:
        return None
    flags = function.__code__.co_flags
    for flag, template in _DRIVERS:
        if flags & flag:
            driver = types.FunctionType(template.__code__, template.__globals__, function.__name__)
            driver.__qualname__ = function.__qualname__
            return driver
    return None


def _same_series(core: _native.MeterCore, function: Any) -> bool:
    """Whether ``function`` is already metered into the series ``core`` records into."""
    existing = getattr(function, "__meterage_meter__", None)
    return (
        isinstance(existing, _native.MeterCore)
        and existing.operation == core.operation
        and existing.attributes == core.attributes
    )


def decorate(core: _native.MeterCore, target: F) -> F:
    function: Any = target
    # staticmethod/classmethod objects: meter the function inside, keep the binding rule.
    if isinstance(function, staticmethod | classmethod):
        return type(function)(decorate(core, function.__func__))  # type: ignore[return-value]
    if not callable(function):
        raise TypeError(
            f"meterage.meter can only decorate callables, not {type(function).__name__}"
        )
    if isinstance(function, type):
        raise TypeError(
            f"meterage.meter cannot decorate the class {function.__qualname__}: the result would "
            "no longer be a class; decorate its __init__ (or __call__) instead"
        )
    if _same_series(core, function):
        # Metered twice into one series would count every call twice: meter the original
        # once, with these settings.
        function = function.__wrapped__
    metered: Any = core.wrap(function, _driver_for(function))
    functools.update_wrapper(metered, function)
    for name in _FUNCTION_LIKE:
        if hasattr(function, name) and types.FunctionType is type(function):
            setattr(metered, name, getattr(function, name))
    metered.__meterage_meter__ = core
    return metered  # type: ignore[no-any-return]  # the wrapper stands for the function
