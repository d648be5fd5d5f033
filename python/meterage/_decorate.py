"""Turning a callable into its metered twin, keeping what kind of callable it is.

Plain callables become a native vectorcall ``MeteredFunction``. Coroutine functions,
generator functions and async generator functions stay what they are (so
``inspect.iscoroutinefunction`` and friends still answer True) and meter their object
step by step, so a call is charged only for its own steps.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from meterage import _native

F = TypeVar("F", bound=Callable[..., Any])


def decorate(core: _native.MeterCore, function: F) -> F:
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
    if inspect.iscoroutinefunction(function):
        return _coroutine_function(core, function)
    if inspect.isasyncgenfunction(function):
        return _async_generator_function(core, function)
    if inspect.isgeneratorfunction(function):
        return _generator_function(core, function)
    metered = core.wrap(function)
    functools.update_wrapper(metered, function)
    return metered  # type: ignore[no-any-return]


def _coroutine_function(core: _native.MeterCore, function: Any) -> Any:
    steps = core.steps

    @functools.wraps(function)
    async def metered(*args: Any, **kwargs: Any) -> Any:
        return await steps(function(*args, **kwargs))

    return metered


def _generator_function(core: _native.MeterCore, function: Any) -> Any:
    steps = core.steps

    @functools.wraps(function)
    def metered(*args: Any, **kwargs: Any) -> Any:
        return (yield from steps(function(*args, **kwargs)))

    return metered


def _async_generator_function(core: _native.MeterCore, function: Any) -> Any:
    # An async generator cannot delegate with `yield from`, so this forwards asend,
    # athrow and aclose by hand, metering each awaitable's steps as part of one call.
    @functools.wraps(function)
    async def metered(*args: Any, **kwargs: Any) -> Any:
        inner = function(*args, **kwargs)
        call = core.call()
        try:
            value = await call.steps(inner.asend(None))
            while True:
                try:
                    sent = yield value
                except GeneratorExit:
                    await call.steps(inner.aclose())
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

    return metered
