"""``meterage.meter``: the decorator and context manager."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar, overload

from meterage import _native
from meterage._decorate import decorate
from meterage._validate import check_fraction, check_name

F = TypeVar("F", bound=Callable[..., Any])
AttributeValue = str | int | float | bool

_warned_unavailable: set[str] = set()


def _warn_unavailable(requested: Iterable[str] | None) -> None:
    """One warning per probe that was asked for by name but cannot run here."""
    if requested is None:
        return
    # Only the probes asked for: asking about "gpu" loads NVML.
    asked = [name for name in requested if isinstance(name, str)]
    for name, reason in _native.available_probes(asked).items():
        if reason is not None and name not in _warned_unavailable:
            _warned_unavailable.add(name)
            warnings.warn(
                f"meterage probe {name!r} is unavailable and will not be recorded: {reason}",
                RuntimeWarning,
                stacklevel=4,
            )


class Meter(_native.MeterCore):
    """Meters calls of one operation: use it as a decorator or a context manager.

    ``with`` and ``async with`` blocks are metered natively; the active call is kept per
    thread and per asyncio task, so one meter can be used nested and concurrently.

    >>> import meterage
    >>> db_query = meterage.meter("db.query", attributes={"db": "orders"})
    >>> with db_query as call:
    ...     call.set_attribute("rows", 3)
    >>> @db_query
    ... def fetch(n):
    ...     return list(range(n))
    >>> fetch(2)
    [0, 1]
    """

    __slots__ = ()

    def __new__(
        cls,
        name: str,
        *,
        attributes: Mapping[str, AttributeValue] | None = None,
        probes: Iterable[str] | None = None,
        sample: float | None = None,
        budget: float | None = None,
    ) -> Meter:
        check_name("the operation name", name)
        sample = check_fraction("sample", sample)
        budget = check_fraction("budget", budget)
        if probes is not None and not isinstance(probes, str):
            probes = tuple(probes)
        self = super().__new__(cls, name, attributes, probes, sample, budget)
        _warn_unavailable(probes)
        return self

    @property
    def name(self) -> str:
        """The operation name."""
        return self.operation

    def __call__(self, function: F) -> F:
        """Decorates ``function``: every call is metered; its behaviour is unchanged."""
        return decorate(self, function)

    async def __aenter__(self) -> _native.Call:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, traceback)

    def __repr__(self) -> str:
        return (
            f"meterage.meter({self.name!r}, attributes={self.attributes!r}, probes={self.probes!r})"
        )


@overload
def meter(target: F, /) -> F: ...
@overload
def meter(
    target: str,
    /,
    *,
    attributes: Mapping[str, AttributeValue] | None = ...,
    probes: Iterable[str] | None = ...,
    sample: float | None = ...,
    budget: float | None = ...,
) -> Meter: ...
def meter(
    target: Any,
    /,
    *,
    attributes: Mapping[str, AttributeValue] | None = None,
    probes: Iterable[str] | None = None,
    sample: float | None = None,
    budget: float | None = None,
) -> Any:
    """Meters a function (``@meterage.meter``) or names an operation (``meterage.meter("x")``).

    Every call is counted and timed. The probes (``"cpu"``, ``"rusage"``, ``"io"``; all three
    by default) run on every call with ``sample=1.0``, on that fixed share of calls with a
    smaller ``sample``, or by default on a share chosen to keep their cost under ``budget``
    of the operation's own wall time (1% unless configured).

    >>> import meterage
    >>> @meterage.meter
    ... def handle(request):
    ...     return request.upper()
    >>> handle("ok")
    'OK'
    >>> @meterage.meter("checkout", attributes={"tier": "gold"}, probes=("cpu",), sample=1.0)
    ... def checkout(cart):
    ...     return sum(cart)
    >>> checkout([1, 2])
    3
    """
    if isinstance(target, str):
        return Meter(target, attributes=attributes, probes=probes, sample=sample, budget=budget)
    if not callable(target) and not isinstance(target, staticmethod | classmethod):
        raise TypeError(
            "meterage.meter takes an operation name (str) or a callable to decorate, "
            f"not {type(target).__name__}"
        )
    inner = target.__func__ if isinstance(target, staticmethod | classmethod) else target
    name = getattr(inner, "__qualname__", None) or getattr(inner, "__name__", None)
    if not isinstance(name, str) or not name:
        name = type(inner).__qualname__
    return Meter(name, attributes=attributes, probes=probes, sample=sample, budget=budget)(target)
