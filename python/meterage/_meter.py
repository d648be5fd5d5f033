"""``meterage.meter``: the decorator and context manager."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, overload

from meterage import _native
from meterage._decorate import decorate
from meterage._validate import check_fraction, check_name, check_probe_names, check_sample

F = TypeVar("F", bound=Callable[..., Any])
AttributeValue = str | int | float | bool

# Probe names already asked about: a meter asking again costs nothing.
_checked_probes: set[str] = set()


def _warn_unavailable(requested: tuple[str, ...]) -> None:
    """One warning per probe that was asked for by name but cannot run here."""
    unchecked = [name for name in requested if name not in _checked_probes]
    if not unchecked:
        return
    # Only the probes asked for: asking about "gpu" loads NVML.
    for name, reason in _native.available_probes(unchecked).items():
        _checked_probes.add(name)
        if reason is not None:
            warnings.warn(
                f"meterage probe {name!r} is unavailable and will not be recorded: {reason}",
                RuntimeWarning,
                stacklevel=4,
            )


class Meter(_native.MeterCore):
    """Meters calls of one operation: use it as a decorator or a context manager.

    ``with`` and ``async with`` blocks are metered natively, and each block ends the call
    it entered: one meter can be used nested, in threads, in tasks and in generators that
    are resumed anywhere. Making a meter is cheap (about a microsecond): a meter made
    again with the same settings reuses the first one's series and sampling state.

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
        sample = check_sample(sample)
        budget = check_fraction("budget", budget)
        names = check_probe_names(probes)
        self = super().__new__(cls, name, attributes, names, sample, budget)
        if names:
            _warn_unavailable(names)
        return self

    @property
    def name(self) -> str:
        """The operation name."""
        return self.operation

    def __call__(self, function: F) -> F:
        """Decorates ``function``: every call is metered; its behaviour is unchanged."""
        return decorate(self, function)

    def open(self, *, probe: bool = False) -> _native.OpenCall:
        """Opens a call that you end yourself (``finish``), started now: a request or a job
        whose work runs in steps (``steps`` of coroutines, ``run`` of functions, in any task
        or thread). ``probe=True`` runs its probes whatever the sampler says.

        >>> import meterage
        >>> call = meterage.meter("example.job").open()
        >>> call.run(sum, [1, 2, 3])
        6
        >>> call.set_attribute("queue", "email")
        >>> call.finish()
        >>> [s.count for s in meterage.snapshot() if s.operation == "example.job"]
        [1]
        """
        if not isinstance(probe, bool):
            raise TypeError(f"probe must be True or False, not {type(probe).__name__}")
        call = self.call()
        call.start(probe=probe)
        return call

    def __repr__(self) -> str:
        return (
            f"meterage.meter({self.name!r}, attributes={self.attributes!r}, probes={self.probes!r})"
        )


_NO_TARGET: Any = object()

# Meters made by name with the same settings (and no attributes), kept so that an inline
# `with meterage.meter("db.query"):` costs a dict lookup: a meter is immutable, and one
# made again would share the first one's series and sampling state anyway.
_made: dict[tuple[Any, ...], Meter] = {}
_MADE_LIMIT = 4096


@overload
def meter(
    target: F,
    /,
    *,
    attributes: Mapping[str, AttributeValue] | None = ...,
    probes: Iterable[str] | None = ...,
    sample: float | None = ...,
    budget: float | None = ...,
) -> F: ...
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
@overload
def meter(
    *,
    attributes: Mapping[str, AttributeValue] | None = ...,
    probes: Iterable[str] | None = ...,
    sample: float | None = ...,
    budget: float | None = ...,
) -> Callable[[F], F]: ...


def meter(
    target: Any = _NO_TARGET,
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
    >>> @meterage.meter(sample=1.0)  # settings without a name: the name is the __qualname__
    ... def lookup(key):
    ...     return key
    >>> lookup("k")
    'k'
    """
    if type(target) is str and attributes is None and (probes is None or type(probes) is tuple):
        key = (target, probes, sample, budget)
        try:
            return _made[key]
        except KeyError:
            pass
        except TypeError:  # unhashable settings: Meter says what is wrong with them
            return Meter(target, probes=probes, sample=sample, budget=budget)
        made = Meter(target, probes=probes, sample=sample, budget=budget)
        if len(_made) < _MADE_LIMIT:
            _made[key] = made
        return made
    if isinstance(target, str):
        return Meter(target, attributes=attributes, probes=probes, sample=sample, budget=budget)
    if target is _NO_TARGET:
        # Settings first, the function later: `@meterage.meter(sample=1.0)`. The settings
        # are checked now, where the mistake is.
        check_sample(sample)
        check_fraction("budget", budget)
        names = check_probe_names(probes)

        def decorator(function: F) -> F:
            return meter(
                function, attributes=attributes, probes=names, sample=sample, budget=budget
            )

        return decorator
    if not callable(target) and not isinstance(target, staticmethod | classmethod):
        raise TypeError(
            "meterage.meter takes an operation name (str) or a callable to decorate, "
            f"not {type(target).__name__}"
        )
    inner = target.__func__ if isinstance(target, staticmethod | classmethod) else target
    name = getattr(inner, "__qualname__", None) or getattr(inner, "__name__", None)
    if not isinstance(name, str) or not name:
        name = type(inner).__qualname__
    meter_of_name = Meter(name, attributes=attributes, probes=probes, sample=sample, budget=budget)
    return meter_of_name(target)
