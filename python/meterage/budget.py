"""``meterage.budget``: a block or function that must not cost more than its limits.

Wall-time limits flake on shared machines; most of what meterage measures does not: bytes
read and written, allocations and faults are counts, and thread CPU time is far steadier
than wall time. A budget measures its block with meterage's probes on every run and raises
``AssertionError`` with a table of every measure that went over.

>>> import os, tempfile
>>> import meterage
>>> with tempfile.TemporaryFile() as file:
...     with meterage.budget(io_write="4KiB", faults_major=0) as spent:
...         _ = os.write(file.fileno(), b"x" * 4096)
>>> spent["io_write"]
4096
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import warnings
from collections.abc import Callable, Generator, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

from meterage import _native
from meterage._meter import Meter

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["MEASURES", "Budget", "Limits", "Spent", "budget", "parse_limit"]

F = TypeVar("F", bound=Callable[..., Any])

#: The operation of the meter that checks, once per budget, that its probes start.
OPERATION = "meterage.budget"


@dataclass(frozen=True)
class Measure:
    """One measure a budget can limit: its keyword, snapshot key, probe and kind."""

    keyword: str
    key: str
    probe: str
    kind: str  # "time" (limits in seconds, kept in ns), "bytes" or "count"


#: Every measure a budget takes, by keyword (the snapshot key with "." as "_", shortened).
MEASURES: Mapping[str, Measure] = {
    m.keyword: m
    for m in (
        Measure("cpu", "cpu.time", "cpu", "time"),
        Measure("io_read", "io.read", "io", "bytes"),
        Measure("io_write", "io.write", "io", "bytes"),
        Measure("disk_read", "disk.io.read", "io", "bytes"),
        Measure("disk_write", "disk.io.write", "io", "bytes"),
        Measure("faults_minor", "paging.faults.minor", "rusage", "count"),
        Measure("faults_major", "paging.faults.major", "rusage", "count"),
        Measure("context_switches_voluntary", "context_switches.voluntary", "rusage", "count"),
        Measure("context_switches_involuntary", "context_switches.involuntary", "rusage", "count"),
        Measure("allocated", "memory.allocated", "alloc", "bytes"),
        Measure("allocations", "memory.allocations", "alloc", "count"),
        Measure("retained", "memory.retained", "alloc", "bytes"),
        Measure("peak", "memory.peak", "alloc", "bytes"),
    )
}
_BY_KEY = {m.key: m for m in MEASURES.values()}


class Limits(TypedDict, total=False):
    """The keywords ``meterage.budget`` takes (each optional; None: not limited)."""

    cpu: str | float | None
    io_read: str | int | None
    io_write: str | int | None
    disk_read: str | int | None
    disk_write: str | int | None
    faults_minor: int | None
    faults_major: int | None
    context_switches_voluntary: int | None
    context_switches_involuntary: int | None
    allocated: str | int | None
    allocations: int | None
    retained: str | int | None
    peak: str | int | None


_TIME_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": 10**9}
_BYTE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "kB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
_ALLOWED = {
    "time": "a number of seconds (0.002) or a str with a unit: ns, us, µs, ms, s ('2ms')",
    "bytes": (
        "a whole number of bytes (65536) or a str with a unit: B, KB, MB, GB, TB (powers "
        "of 1000), KiB, MiB, GiB, TiB (powers of 1024) ('64KiB')"
    ),
    "count": "a whole number (an int, such as 0)",
}


def parse_limit(keyword: str, value: Any) -> int:
    """A limit in its base unit as an int: nanoseconds for ``cpu``, bytes, or a count.

    Numbers are seconds for time (as everywhere in meterage) and bytes for sizes; strings
    carry a unit. KB, MB, GB are powers of 1000, KiB, MiB, GiB powers of 1024.

    >>> from meterage.budget import parse_limit
    >>> parse_limit("cpu", "2ms"), parse_limit("cpu", 0.0015), parse_limit("cpu", "250 µs")
    (2000000, 1500000, 250000)
    >>> parse_limit("io_write", "64KiB"), parse_limit("io_write", "1.5KB"), parse_limit("peak", 7)
    (65536, 1500, 7)
    """
    if keyword not in MEASURES:
        raise ValueError(
            f"meterage.budget has no measure {keyword!r}; the measures are: " + ", ".join(MEASURES)
        )
    kind = MEASURES[keyword].kind
    allowed = _ALLOWED[kind]
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"{keyword} must be {allowed}, not {type(value).__name__}")
    if kind == "count" and not isinstance(value, int):
        raise TypeError(f"{keyword} must be {allowed}, not {type(value).__name__} {value!r}")
    if isinstance(value, str):
        number, scale = _split_unit(keyword, value, kind, allowed)
    else:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{keyword} must be {allowed}, got {value!r}")
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        scale = 10**9 if kind == "time" else 1
    if number < 0:
        raise ValueError(f"{keyword} must not be negative, got {value!r}")
    amount = number * scale
    if amount != amount.to_integral_value():
        what = "nanoseconds" if kind == "time" else "bytes"
        raise ValueError(
            f"{keyword} must be a whole number of {what}, got {value!r} ({amount.normalize()} "
            f"{what})"
        )
    return int(amount)


def _split_unit(keyword: str, text: str, kind: str, allowed: str) -> tuple[Decimal, int]:
    units = _TIME_UNITS if kind == "time" else _BYTE_UNITS
    stripped = text.strip()
    digits = stripped.rstrip("".join({c for unit in units for c in unit}) + " ")
    unit = stripped[len(digits) :].strip()
    if unit not in units:
        raise ValueError(f"{keyword} must be {allowed}; {text!r} has no unit of those")
    try:
        number = Decimal(digits.strip())
    except InvalidOperation:
        raise ValueError(f"{keyword} must be {allowed}; {text!r} is not a number") from None
    if not number.is_finite():
        raise ValueError(f"{keyword} must be {allowed}; {text!r} is not finite")
    return number, units[unit]


def format_value(keyword_or_key: str, value: float) -> str:
    """A measured or allowed value for people: times in ns/µs/ms/s, bytes with IEC units.

    >>> from meterage.budget import format_value
    >>> format_value("cpu", 2_500_000), format_value("io.write", 65536)
    ('2.50 ms', '64.0 KiB (65536 B)')
    """
    measure = MEASURES.get(keyword_or_key) or _BY_KEY[keyword_or_key]
    if measure.kind == "time":
        for unit, scale in (("s", 10**9), ("ms", 10**6), ("µs", 10**3)):
            if abs(value) >= scale:
                return f"{value / scale:.2f} {unit}"
        return f"{value:.0f} ns"
    if measure.kind == "bytes":
        for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(value) >= scale:
                return f"{value / scale:.1f} {unit} ({value:.0f} B)"
        return f"{value:.0f} B"
    return f"{value:.0f}"


# ---------------------------------------------------------------------------------------
# Measuring one block exactly: the thread's probe counters before and after (nothing is
# recorded in any series, so budgets never show in snapshots or exports).


class _Measurement:
    """What one block, or the steps of one coroutine or generator, cost on their thread:
    each step between two readings of ``probes``, the steps' values summed."""

    __slots__ = ("_reading", "_values", "probes")

    def __init__(self, probes: tuple[str, ...]) -> None:
        self.probes = probes
        self._reading: _native.ThreadReading | None = None
        # None once a step could not be measured (it ended in another thread).
        self._values: dict[str, float] | None = {}

    def start(self) -> None:
        self._reading = _native.ThreadReading(self.probes)

    def stop(self) -> None:
        reading, self._reading = self._reading, None
        if reading is None:
            return
        moved = reading.since()
        if moved is None or self._values is None:
            self._values = None
            return
        for key, value in moved.items():
            if key in _WANTED_KEYS and _BY_KEY[key].probe in self.probes:
                self._values[key] = self._values.get(key, 0) + (
                    round(value * 1e9) if key == "cpu.time" else value
                )

    def values(self) -> dict[str, float] | None:
        """The values by snapshot key (cpu.time in ns), or None when a step could not be
        measured."""
        return None if self._values is None else dict(self._values)


_WANTED_KEYS = frozenset(m.key for m in MEASURES.values())


@types.coroutine
def _pass_on(value: Any) -> Generator[Any, Any, Any]:
    """Yields what the inner coroutine yielded to the event loop, and gives back what the
    loop sends (or raises what it throws)."""
    return (yield value)


class Spent(Mapping[str, float]):
    """What a budgeted block cost, by measure keyword (``cpu`` in seconds, bytes, counts):
    every measure of the probes the budget ran, filled in when the block ends.

    >>> import meterage
    >>> with meterage.budget(allocations=10_000) as spent:
    ...     _ = [str(i) for i in range(100)]
    >>> 100 <= spent["allocations"] <= 10_000
    True
    """

    def __init__(self) -> None:
        self._values: dict[str, float] = {}

    def _fill(self, by_key: Mapping[str, float]) -> None:
        for key, value in by_key.items():
            measure = _BY_KEY.get(key)
            if measure is not None:
                self._values[measure.keyword] = value / 1e9 if measure.kind == "time" else value

    def __getitem__(self, keyword: str) -> float:
        try:
            return self._values[keyword]
        except KeyError:
            raise KeyError(
                f"{keyword!r} was not measured (the block has not ended, or the budget ran "
                f"no probe for it); measured: {', '.join(self._values) or 'nothing yet'}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Spent({self._values!r})"


class Budget:
    """Limits on what a block or function may cost: ``with`` it, or decorate with it.

    Made by ``meterage.budget(...)``; see its docstring. One ``Budget`` can be entered many
    times, nested, and from many threads at once: each entry is measured on its own.
    """

    __slots__ = ("__weakref__", "_entered", "_given", "_open", "limits", "probes")

    def __init__(self, limits: Mapping[str, int], given: Mapping[str, Any] | None = None) -> None:
        self._given = dict(given if given is not None else limits)
        #: The limits in base units: ns for cpu, bytes, counts.
        self.limits: dict[str, int] = dict(limits)
        self.probes: tuple[str, ...] = tuple(
            sorted({MEASURES[keyword].probe for keyword in self.limits})
        )
        self._entered: ContextVar[tuple[tuple[_Measurement, Spent], ...]] = ContextVar(
            "meterage.budget", default=()
        )
        # Every entry in flight, in any context: a block whose generator is resumed in
        # another thread or context is found here when it is the only one.
        self._open: list[tuple[_Measurement, Spent]] = []

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self._given.items())
        return f"meterage.budget({shown})"

    # --- the block form -------------------------------------------------------------

    def __enter__(self) -> Spent:
        spent = Spent()
        if not self.probes:
            return spent
        measurement = _Measurement(self.probes)
        entry = (measurement, spent)
        self._entered.set((*self._entered.get(), entry))
        self._open.append(entry)
        measurement.start()
        return spent

    def __exit__(
        self,
        exception_type: type[BaseException] | None,
        exception: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self.probes:
            return
        stack = self._entered.get()
        if stack and stack[-1] in self._open:
            entry = stack[-1]
        elif len(self._open) == 1:  # entered in another context (a resumed generator)
            entry = self._open[0]
        else:
            raise RuntimeError(
                f"{self!r} was exited without being entered in this context"
                + (f" ({len(self._open)} entries of it are open elsewhere)" if self._open else "")
            )
        # The block ends first: nothing of the budget's own work is charged to it.
        measurement, spent = entry
        measurement.stop()
        values = measurement.values()
        self._open.remove(entry)
        if stack and stack[-1] is entry:
            self._entered.set(stack[:-1])
        if exception_type is not None:
            if values:
                spent._fill(values)
            return  # the block's own exception propagates unchanged
        self._check(values, spent)

    def _check(self, values: Mapping[str, float] | None, spent: Spent) -> None:
        if values is None:
            raise RuntimeError(
                f"{self!r} could not measure its block: the probes gave no values (a block "
                "that ends in another thread than it began has no per-thread readings)"
            )
        spent._fill(values)
        over = []
        for keyword, allowed in self.limits.items():
            key = MEASURES[keyword].key
            if key not in values:
                raise RuntimeError(f"{self!r} could not measure {keyword} ({key}) of its block")
            if values[key] > allowed:
                over.append((keyword, values[key], allowed))
        if over:
            raise AssertionError(_table(self, over))

    # --- the decorator form -----------------------------------------------------------

    def __call__(self, function: F) -> F:
        """Decorates ``function`` (plain, ``async def``, generator or async generator): each
        call is measured and checked when it ends. Its behaviour is unchanged."""
        if not callable(function):
            raise TypeError(
                f"a budget decorates a callable, not {type(function).__name__}; "
                "use `with meterage.budget(...):` for a block"
            )
        checked = self
        if inspect.isasyncgenfunction(function):
            raise TypeError(
                "meterage.budget does not decorate async generator functions (its steps run "
                "between other tasks' work): budget the work each item takes instead"
            )
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def run_coroutine(*args: Any, **kwargs: Any) -> Any:
                return await checked._steps(function(*args, **kwargs))

            return run_coroutine  # type: ignore[return-value]
        if inspect.isgeneratorfunction(function):

            @functools.wraps(function)
            def run_generator(*args: Any, **kwargs: Any) -> Any:
                return (yield from checked._generator(function(*args, **kwargs)))

            return run_generator  # type: ignore[return-value]

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            with checked:
                return function(*args, **kwargs)

        return run  # type: ignore[return-value]

    async def _steps(self, coroutine: Any) -> Any:
        # Each step of the coroutine is measured (not the other tasks' work while it awaits).
        if not self.probes:
            return await coroutine
        measurement = _Measurement(self.probes)
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            done, value = _measured_step(measurement, coroutine, sent, thrown)
            if done:
                break
            sent, thrown = None, None
            try:
                sent = await _pass_on(value)
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as error:  # the loop's (a cancellation): into the coroutine
                thrown = error
        self._check(measurement.values(), Spent())
        return value

    def _generator(self, generator: Any) -> Any:
        # Each step is measured; the check comes when it is exhausted.
        if not self.probes:
            return (yield from generator)
        measurement = _Measurement(self.probes)
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            done, value = _measured_step(measurement, generator, sent, thrown)
            if done:
                break
            sent, thrown = None, None
            try:
                sent = yield value
            except GeneratorExit:  # closed early: not checked
                generator.close()
                raise
            except BaseException as error:
                thrown = error
        self._check(measurement.values(), Spent())
        return value


def _measured_step(
    measurement: _Measurement, inner: Any, sent: Any, thrown: BaseException | None
) -> tuple[bool, Any]:
    """One step of a coroutine or generator between two readings: (False, what it yielded)
    or (True, what it returned); what it raises propagates."""
    measurement.start()
    try:
        if thrown is not None:
            return False, inner.throw(thrown)
        return False, inner.send(sent)
    except StopIteration as stop:
        return True, stop.value
    finally:
        measurement.stop()


def _table(checked: Budget, over: list[tuple[str, float, int]]) -> str:
    rows = [("measure", "measured", "allowed", "over by")]
    for keyword, measured, allowed in over:
        excess = measured - allowed
        share = f" (+{excess / allowed:.0%})" if allowed else ""
        rows.append(
            (
                keyword,
                format_value(keyword, measured),
                format_value(keyword, allowed),
                format_value(keyword, excess) + share,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    what = "measure" if len(over) == 1 else "measures"
    return f"{checked!r}: {len(over)} {what} over budget\n" + "\n".join(lines)


def budget(**limits: Unpack[Limits]) -> Budget:
    """Limits on what a block or a function's calls may cost, checked exactly on every run.

    ``with meterage.budget(...) as spent:`` measures the block (the thread running it) with
    meterage's probes, every time, with only the probes its limits need; at the end it
    raises ``AssertionError`` with a table (measure, measured, allowed, over by) of every
    measure over its limit. A block that raises is not checked: its exception propagates
    unchanged. ``spent`` maps each measured keyword to its value once the block ended.
    ``@meterage.budget(...)`` checks each call of a function, an ``async def`` (over its own
    steps, not other tasks' work while it awaits) or a generator (over its steps, when it is
    exhausted).

    Limits (inclusive; None: not limited): ``cpu`` (thread CPU time: seconds, or "2ms",
    "250us", "1s"); bytes ``io_read``, ``io_write`` (read/write syscalls), ``disk_read``,
    ``disk_write`` (storage), ``allocated``, ``retained``, ``peak`` (the ``alloc`` probe):
    ints, or "64KiB", "1MB" (KB, MB, GB powers of 1000; KiB, MiB, GiB powers of 1024);
    counts ``faults_minor``, ``faults_major``, ``context_switches_voluntary``,
    ``context_switches_involuntary``, ``allocations``: ints.

    >>> import meterage
    >>> with meterage.budget(cpu="1s", allocations=100_000) as spent:
    ...     total = sum(range(1000))
    >>> spent["cpu"] < 1.0
    True
    >>> @meterage.budget(io_write=0)
    ... def pure(x):
    ...     return x * 2
    >>> pure(21)
    42
    >>> try:
    ...     with meterage.budget(allocations=0):
    ...         _ = [str(i) for i in range(100)]
    ... except AssertionError as error:
    ...     print(str(error).splitlines()[0])
    meterage.budget(allocations=0): 1 measure over budget
    """
    if not limits:
        raise TypeError(
            "meterage.budget needs at least one limit, such as cpu='2ms' or io_write=0; the "
            "measures are: " + ", ".join(MEASURES)
        )
    parsed: dict[str, int] = {}
    for keyword, value in limits.items():
        if keyword not in MEASURES:
            raise ValueError(
                f"meterage.budget has no measure {keyword!r}; the measures are: "
                + ", ".join(MEASURES)
            )
        if value is not None:
            parsed[keyword] = parse_limit(keyword, value)
    needed = sorted({MEASURES[keyword].probe for keyword in parsed})
    if needed:
        for probe, reason in _native.available_probes(needed).items():
            if reason is not None:
                names = ", ".join(k for k in parsed if MEASURES[k].probe == probe)
                raise ValueError(
                    f"{names} cannot be measured here: it needs the {probe!r} probe, which is "
                    f"unavailable: {reason}"
                )
        # Some probes are known to fail only when a meter first asks (the allocator hooks).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = Meter(OPERATION, probes=needed, sample=1.0).probes
        for probe in set(needed) - set(got):
            reason = _native.available_probes([probe])[probe] or "it did not start"
            names = ", ".join(k for k in parsed if MEASURES[k].probe == probe)
            raise ValueError(
                f"{names} cannot be measured here: it needs the {probe!r} probe, which is "
                f"unavailable: {reason}"
            )
    return Budget(parsed, {k: v for k, v in limits.items() if v is not None})
