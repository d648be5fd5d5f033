"""What metering costs on *your* function: the bare call against its metered variants.

``measure(function, args=...)`` times ``function(*args, **kwargs)`` bare and wrapped by
``meterage.meter`` in each chosen mode, interleaved in this process, the way
``python -m meterage bench`` times its own stand-ins (``meterage.cli.overhead``): each call
compiled into an unrolled loop, batches of ``batch_ms``, ``rounds`` rounds in an order
shuffled per round with the garbage collector off, and a mode's overhead the median over
rounds of its per-call time minus the bare call's *in the same round*.

The modes:

* ``"timer"``: ``meterage.meter(probes=())``, every call counted and timed, no probe;
* ``"default"``: meterage's defaults (its probes on a share of calls chosen to keep their
  cost within the overhead budget, 1% of the call's own time unless configured);
* ``"full"``: all of ``cpu``, ``rusage`` and ``io`` on every call (``sample=1.0``).

``probes=`` replaces the probe set of ``"default"`` and ``"full"``; ``sample=`` fixes the
probing rate of ``"default"``. The metered variants record into the operations
``meterage.overhead.<mode>`` (they show in ``meterage.snapshot()``).

>>> import meterage.overhead
>>> def parse(text):
...     return text.split(",")
>>> result = meterage.overhead.measure(parse, args=("a,b,c",), modes=("timer",), rounds=5,
...                                    batch_ms=0.5)
>>> result.modes[0].mode, result.rounds
('timer', 5)
>>> result.overhead_ns("timer") < 100_000
True
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from meterage.cli import overhead as _bench

__all__ = ["MODES", "ModeOverhead", "OverheadResult", "measure"]

MODES = ("timer", "default", "full")
"""The modes ``measure`` knows, in the order it reports them."""

OPERATION_PREFIX = "meterage.overhead."
"""The metered variants record into ``meterage.overhead.<mode>``."""

_BARE = "bare"


@dataclass(frozen=True)
class ModeOverhead:
    """One mode's figures: per-call time, overhead over the bare call and its interval.

    ``relative`` is a fraction of the bare call's time (0.02 is 2%); the intervals are 90%
    bootstrap intervals over the rounds (how far the rounds' noise moves the median).
    ``probed_share`` is the share of the measured calls that ran the probes (None for
    ``"timer"``, which runs none).

    >>> import meterage.overhead
    >>> full = meterage.overhead.measure(abs, args=(-1,), modes=("full",), rounds=5,
    ...                                  batch_ms=0.5)["full"]
    >>> full.sample, full.probed_share
    (1.0, 1.0)
    """

    mode: str
    ns_per_call: float
    overhead_ns: float
    relative: float
    interval_ns: tuple[float, float]
    relative_interval: tuple[float, float]
    probes: tuple[str, ...]
    sample: float | None
    """The fixed probing rate, or None where it adapts to the overhead budget."""
    probed_share: float | None

    def to_dict(self) -> dict[str, Any]:
        """The figures as plain JSON-ready data."""
        return {
            "ns_per_call": self.ns_per_call,
            "overhead_ns": self.overhead_ns,
            "relative": self.relative,
            "interval90_ns": list(self.interval_ns),
            "relative_interval90": list(self.relative_interval),
            "probes": list(self.probes),
            "sample": self.sample,
            "probed_share": self.probed_share,
        }


@dataclass(frozen=True)
class OverheadResult:
    """What ``measure`` found: the bare call's time and one ``ModeOverhead`` per mode.

    >>> import meterage.overhead
    >>> result = meterage.overhead.measure(abs, args=(-3,), modes=("timer", "full"),
    ...                                    rounds=5, batch_ms=0.5)
    >>> [mode.mode for mode in result.modes]
    ['timer', 'full']
    >>> sorted(result.to_dict()["modes"])
    ['full', 'timer']
    >>> result.relative("timer") == result["timer"].relative
    True
    """

    function: str
    """The measured function's qualified name."""
    bare_ns: float
    """Median ns per bare call."""
    modes: tuple[ModeOverhead, ...]
    rounds: int
    batch_ms: float
    machine: str
    """Python, OS and CPU count of the machine that measured."""

    def __getitem__(self, mode: str) -> ModeOverhead:
        for measured in self.modes:
            if measured.mode == mode:
                return measured
        names = ", ".join(repr(measured.mode) for measured in self.modes)
        raise KeyError(f"mode {mode!r} was not measured; measured: {names}")

    def overhead_ns(self, mode: str) -> float:
        """The mode's overhead per call in ns (median of per-round differences)."""
        return self[mode].overhead_ns

    def relative(self, mode: str) -> float:
        """The mode's overhead as a fraction of the bare call (0.02 is 2%)."""
        return self[mode].relative

    def interval_ns(self, mode: str) -> tuple[float, float]:
        """The 90% bootstrap interval of the mode's overhead in ns."""
        return self[mode].interval_ns

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-ready data (``json.dumps(result.to_dict())``)."""
        return {
            "function": self.function,
            "bare_ns_per_call": self.bare_ns,
            "rounds": self.rounds,
            "batch_ms": self.batch_ms,
            "machine": self.machine,
            "modes": {measured.mode: measured.to_dict() for measured in self.modes},
        }

    def format_table(self) -> str:
        """A text table: per mode, ns per call, overhead in ns and in % of the bare call,
        with their 90% intervals."""
        rows = [("bare call", _ns(self.bare_ns), "", "", "", "")]
        for measured in self.modes:
            low, high = measured.interval_ns
            rel_low, rel_high = measured.relative_interval
            share = measured.probed_share
            rows.append(
                (
                    _LABELS[measured.mode],
                    _ns(measured.ns_per_call),
                    f"{measured.overhead_ns:+,.1f}",
                    f"[{low:+,.1f}, {high:+,.1f}]",
                    f"{measured.relative * 100:+.2f}% "
                    f"[{rel_low * 100:+.2f}, {rel_high * 100:+.2f}]",
                    "" if share is None else f"{share:.1%}",
                )
            )
        header = ("subject", "ns/call", "overhead ns", "90% interval", "relative [90%]", "probed")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [
            f"overhead of meterage on {self.function}: {self.rounds} interleaved rounds, "
            f"batches of {self.batch_ms:g} ms, medians of per-round differences",
            self.machine,
        ]
        for row in [header, *rows]:
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
            lines.append("  " + "  ".join(cells).rstrip())
        return "\n".join(lines)


_LABELS = {
    "timer": "timer only (probes=())",
    "default": "defaults (budgeted probes)",
    "full": "full probes (sample=1.0)",
}


def _ns(value: float) -> str:
    return f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"


def _describe(function: Callable[..., Any]) -> str:
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", None)
    module = getattr(function, "__module__", None)
    if isinstance(name, str):
        return f"{module}.{name}" if isinstance(module, str) and module != "builtins" else name
    return repr(function)


def _check_modes(modes: Iterable[str]) -> tuple[str, ...]:
    if isinstance(modes, str):
        raise TypeError(
            f"modes must be a sequence of mode names such as ({modes!r},), got the string "
            f"{modes!r}; choose from {', '.join(MODES)}"
        )
    try:
        chosen = tuple(modes)
    except TypeError:
        raise TypeError(
            f"modes must be a sequence of mode names, got {type(modes).__name__}; "
            f"choose from {', '.join(MODES)}"
        ) from None
    if not chosen:
        raise ValueError(f"modes must name at least one mode; choose from {', '.join(MODES)}")
    for mode in chosen:
        if mode not in MODES:
            raise ValueError(f"modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"modes: each mode once, got {list(chosen)}")
    return tuple(mode for mode in MODES if mode in chosen)


def _check_number(name: str, value: object, *, integer: bool) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        what = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")


def _statement(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    parts = (["*a"] if args else []) + (["**k"] if kwargs else [])
    return f"f({', '.join(parts)})"


def _first_call(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any], name: str
) -> None:
    try:
        returned = function(*args, **kwargs)
    except Exception as error:
        raise ValueError(
            f"function: {name} raised {type(error).__name__} on its first call: {error}; "
            "measure() times calls that return (check args, kwargs and setup)"
        ) from error
    if inspect.iscoroutine(returned) or inspect.isgenerator(returned):
        returned.close()  # not started: closing runs none of its code
    if (
        inspect.iscoroutine(returned)
        or inspect.isgenerator(returned)
        or inspect.isasyncgen(returned)
    ):
        raise TypeError(
            f"function: {name} returned a {type(returned).__name__}, which would be created "
            "and never run; measure() times plain calls (time a function that runs it, "
            "e.g. one calling asyncio.run or list(...))"
        )


def measure(
    function: Callable[..., Any],
    *,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    setup: Callable[[], object] | None = None,
    modes: Iterable[str] = MODES,
    probes: Iterable[str] | None = None,
    sample: float | None = None,
    rounds: int = 100,
    batch_ms: float = 2.0,
    seed: int | None = None,
) -> OverheadResult:
    """Measures meterage's per-call overhead on ``function(*args, **kwargs)``.

    ``setup``, if given, is called once first (e.g. to fill a cache the function reads).
    The function is then called once, and must return: a call that raises is reported
    (``ValueError`` naming the exception), never timed. A call that raises later, while
    timed, raises ``RuntimeError``. Already metered functions are measured unwrapped
    (their ``__wrapped__``), so the bare call has no meterage in it.

    ``modes``: any of ``"timer"``, ``"default"``, ``"full"`` (see the module doc);
    ``probes`` replaces the probes of ``"default"`` and ``"full"``, ``sample`` fixes the
    rate of ``"default"``. ``rounds`` interleaved rounds of one ``batch_ms`` batch per
    subject; ``seed`` fixes the shuffled order. The garbage collector is off while timing.

    >>> import meterage.overhead
    >>> result = meterage.overhead.measure(sorted, args=([3, 1, 2],), modes=("timer",),
    ...                                    rounds=5, batch_ms=0.5)
    >>> result.bare_ns > 0 and result["timer"].probes == ()
    True
    """
    import meterage
    from meterage import _native

    if not callable(function):
        raise TypeError(f"function must be callable, got {type(function).__name__} {function!r}")
    if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
        raise TypeError(
            f"function: {_describe(function)} is an async function, whose call only creates "
            "a coroutine; measure() times plain calls (time a function that runs it, e.g. "
            "one calling asyncio.run)"
        )
    if isinstance(function, meterage.MeteredFunction | meterage.MeteredCallable):
        function = function.__wrapped__
    name = _describe(function)
    if isinstance(args, str | bytes) or not isinstance(args, Sequence):
        raise TypeError(
            f"args must be a tuple or list of positional arguments, got "
            f"{type(args).__name__} {args!r} (one argument x: args=(x,))"
        )
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(key, str) for key in kwargs):
        raise TypeError(f"kwargs must be a mapping of str keyword names, got {kwargs!r}")
    if setup is not None and not callable(setup):
        raise TypeError(
            f"setup must be a callable taking no arguments, or None; got "
            f"{type(setup).__name__} {setup!r}"
        )
    chosen = _check_modes(modes)
    _check_number("rounds", rounds, integer=True)
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    _check_number("batch_ms", batch_ms, integer=False)
    if not (math.isfinite(batch_ms) and batch_ms > 0):
        raise ValueError(f"batch_ms must be a positive, finite number of ms, got {batch_ms}")
    # A str goes to meterage.meter as it is: it says why a str is not a probe list.
    probe_names = probes if probes is None or isinstance(probes, str) else tuple(probes)

    # The meters first: meterage.meter checks probes and sample itself.
    meters = {
        "timer": meterage.meter(OPERATION_PREFIX + "timer", probes=()),
        "default": meterage.meter(OPERATION_PREFIX + "default", probes=probe_names, sample=sample),
        "full": meterage.meter(
            OPERATION_PREFIX + "full",
            probes=_bench.ALL_PROBES if probe_names is None else probe_names,
            sample=1.0,
        ),
    }
    positional = tuple(args)
    keywords = dict(kwargs)
    if setup is not None:
        setup()
    _first_call(function, positional, keywords, name)
    # One-time probe setup (the CPU clock's calibration, /proc/thread-self/io opened)
    # before the adaptive sampler starts from its costs, as in a warmed-up service.
    _native.floor_wrap(_bench.work, list(_bench.ALL_PROBES))(1)

    statement = _statement(positional, keywords)
    namespace: dict[str, Any] = {"a": positional, "k": keywords}
    subjects = [_bench.Subject(_BARE, "bare call", name, statement, {**namespace, "f": function})]
    shares: dict[str, _bench.ProbedShare] = {}
    for mode in chosen:
        if mode != "timer":
            shares[mode] = _bench.ProbedShare(meters[mode].name)
        subjects.append(
            _bench.Subject(
                mode,
                _LABELS[mode],
                name,
                statement,
                {**namespace, "f": meters[mode](function)},
                baseline=_BARE,
                operation=meters[mode].name,
                note=shares.get(mode),
            )
        )
    try:
        results = _bench.measure(subjects, rounds=rounds, batch_ms=batch_ms, seed=seed)
    except Exception as error:
        raise RuntimeError(
            f"function: {name} raised {type(error).__name__} while it was being timed: "
            f"{error}; measure() times calls that return"
        ) from error

    measured = []
    for mode in chosen:
        pair = _bench.Results(
            {key: results.subjects[key] for key in (_BARE, mode)},
            {key: results.samples[key] for key in (_BARE, mode)},
        )
        share = shares[mode].share() if mode != "timer" else None
        measured.append(
            ModeOverhead(
                mode=mode,
                ns_per_call=results.per_call(mode),
                overhead_ns=results.overhead(mode),
                relative=results.relative_overhead(mode),
                interval_ns=_bench.bootstrap_interval(
                    pair, partial(_bench.Results.overhead, key=mode)
                ),
                relative_interval=_bench.bootstrap_interval(
                    pair, partial(_bench.Results.relative_overhead, key=mode)
                ),
                probes=tuple(meters[mode].probes),
                sample=1.0 if mode == "full" else (sample if mode == "default" else None),
                probed_share=share,
            )
        )
    return OverheadResult(
        function=name,
        bare_ns=results.per_call(_BARE),
        modes=tuple(measured),
        rounds=rounds,
        batch_ms=float(batch_ms),
        machine=_bench.machine_line(),
    )
