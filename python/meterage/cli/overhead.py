"""Per-call overhead of meterage, its native floor and its peers, measured side by side.

Shared by ``python -m meterage bench``, the CI gate (``benches/check_overhead.py``) and the
pytest-benchmark suite, so all three time the same code the same way.

How a number is made: each subject is one statement (usually ``f(1)``) compiled into a
loop unrolled ``UNROLL`` times, so the loop's own cost is small and the same for every
subject. A *sample* is the mean time per call (``time.perf_counter_ns``) of one batch of
a few ms. A run is a number of rounds; each round times one batch of every subject, in an
order shuffled per round, with the garbage collector off, so a slow stretch of a shared
machine hits every subject alike instead of one of them. A subject's overhead is the
median over rounds of its sample minus its baseline's sample *in the same round* (paired,
so drift cancels); a ratio of overheads is the ratio of those medians. The ~10 µs pair is
measured in its own, longer run: its 2% effect needs many more rounds than the others.
"""

from __future__ import annotations

import gc
import importlib.util
import itertools
import math
import os
import platform
import random
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

UNROLL = 10
"""Calls per loop iteration: keeps the loop's share of a bare call's time small."""

BARE = "bare"
FLOOR = "floor.timer"
TIMER = "meterage.timer"
FLOOR_PROBES = "floor.probes"
FULL = "meterage.full"
BARE_10US = "bare.10us"
DEFAULT_10US = "meterage.default.10us"

ALL_PROBES = ("cpu", "rusage", "io")
DEFAULT_OPERATION = "meterage.bench.default"

SECTION_TRIVIAL = "trivial function `def work(x): return x`"
SECTION_PROBES = "trivial function, probes on every call"
SECTION_PEERS = "peers, timing the same trivial function"
SECTION_10US = "a ~10 µs pure-Python function, meterage defaults"
SECTION_STEPPED = "coroutines and generators, timer only (driven without an event loop)"


def work(x: Any) -> Any:
    """The trivial function every subject wraps."""
    return x


async def work_async(x: Any) -> Any:
    """The trivial coroutine: one step, then its return value."""
    return x


def work_items(n: int) -> Any:
    """The trivial generator: ``n`` items."""
    yield from range(n)


# One coroutine call driven to its end as an event loop would, and one generator consumed.
_RUN_COROUTINE = "try:\n    f(1).send(None)\nexcept StopIteration:\n    pass"
_CONSUME_ITEMS = "for _ in f(16):\n    pass"


def _spin_function(iterations: int) -> Callable[[Any], Any]:
    def spin(x: Any) -> Any:
        for _ in range(iterations):
            pass
        return x

    return spin


def _time_calls(function: Callable[[Any], Any], calls: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(calls):
        function(1)
    return (time.perf_counter_ns() - started) / calls


def ten_microsecond_function(target_ns: float = 10_000.0) -> Callable[[Any], Any]:
    """A pure-Python loop calibrated once to take about ``target_ns`` per call here.

    Calibrated on the fastest of many short timings: on a shared machine the speed
    changes from one moment to the next, and the fastest is the speed that repeats.
    """
    # Above 256 the loop's ints are no longer cached small ints and each step costs more,
    # so start there; the later passes correct for the fixed per-call part.
    iterations = 1000
    for _ in range(3):
        function = _spin_function(iterations)
        per_call = min(_time_calls(function, 20) for _ in range(50))
        iterations = max(1, round(iterations * target_ns / per_call))
    return _spin_function(iterations)


_LOOP_TEMPLATE = """
def _run(_loops, {params}):
    _started = _clock()
    for _ in _repeat(None, _loops):
{body}
    return _clock() - _started
"""


def compile_loop(statement: str, namespace: Mapping[str, Any]) -> Callable[[int], int]:
    """``run(loops)``: executes ``statement`` ``loops * UNROLL`` times, returns elapsed ns.

    The namespace's names become default arguments, i.e. fast locals, as in timeit.
    """
    bound = {"_clock": time.perf_counter_ns, "_repeat": itertools.repeat, **namespace}
    params = ", ".join(f"{name}={name}" for name in bound)
    one = textwrap.indent(textwrap.dedent(statement).strip(), " " * 8)
    source = _LOOP_TEMPLATE.format(params=params, body="\n".join([one] * UNROLL))
    scope: dict[str, Any] = dict(bound)
    exec(compile(source, f"<meterage bench: {statement.strip()[:40]}>", "exec"), scope)
    return scope["_run"]  # type: ignore[no-any-return]


@dataclass
class Subject:
    """One way of calling ``work`` (or the ~10 µs function), timed per call."""

    key: str
    label: str
    section: str
    statement: str
    namespace: dict[str, Any]
    baseline: str | None = None
    """Key of the subject whose per-call time is subtracted to get this one's overhead."""
    floor: str | None = None
    """Key of the native floor this subject's overhead is compared with."""
    peer: bool = False
    """A prometheus_client or OpenTelemetry subject (compared with meterage timer-only)."""
    operation: str | None = None
    """The meterage operation the subject records into, if any."""
    note: Callable[[], str] | None = None
    """Extra words for the table, computed after the run (e.g. the share of calls probed)."""
    run: Callable[[int], int] = field(init=False, repr=False)
    loops: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        self.run = compile_loop(self.statement, self.namespace)

    def sample(self) -> float:
        """Times one batch; returns ns per call."""
        return self.run(self.loops) / (self.loops * UNROLL)

    def calibrate(self, batch_ns: float, warmup_ns: float = 20e6) -> None:
        """Warms the subject up (adaptive sampling settles) and sizes a batch to ``batch_ns``."""
        loops = 1
        while (elapsed := self.run(loops)) < 1e6 and loops < 1 << 20:
            loops *= 4
        per_loop = elapsed / loops
        self.run(max(1, math.ceil(warmup_ns / per_loop)))
        per_loop = min(per_loop, self.run(loops) / loops)
        self.loops = max(1, math.ceil(batch_ns / per_loop))


def meterage_subjects(extended: bool = False) -> list[Subject]:
    """Bare call, the native floors and meterage's wrappers of ``work``."""
    import meterage
    from meterage import _native

    timer = meterage.meter("meterage.bench.timer", probes=())(work)
    full = meterage.meter("meterage.bench.full", probes=ALL_PROBES, sample=1.0)(work)
    subjects = [
        Subject(BARE, "bare call", SECTION_TRIVIAL, "f(1)", {"f": work}),
        Subject(
            FLOOR,
            "floor: native wrapper, clock + log2 bucket",
            SECTION_TRIVIAL,
            "f(1)",
            {"f": _native.floor_wrap(work)},
            baseline=BARE,
            floor=FLOOR,
        ),
        Subject(
            TIMER,
            "@meterage.meter(probes=()), timer only",
            SECTION_TRIVIAL,
            "f(1)",
            {"f": timer},
            baseline=BARE,
            floor=FLOOR,
            operation="meterage.bench.timer",
        ),
        Subject(
            FLOOR_PROBES,
            "floor: clock + cpu, rusage, io readings",
            SECTION_PROBES,
            "f(1)",
            {"f": _native.floor_wrap(work, list(ALL_PROBES))},
            baseline=BARE,
            floor=FLOOR_PROBES,
        ),
        Subject(
            FULL,
            "@meterage.meter(all probes, sample=1.0)",
            SECTION_PROBES,
            "f(1)",
            {"f": full},
            baseline=BARE,
            floor=FLOOR_PROBES,
            operation="meterage.bench.full",
        ),
    ]
    if extended:
        block = meterage.meter("meterage.bench.block", probes=())
        cpu = meterage.meter("meterage.bench.cpu", probes=("cpu",), sample=1.0)(work)
        subjects.insert(
            3,
            Subject(
                "meterage.timer.with",
                "with meterage.meter(probes=()): work(1)",
                SECTION_TRIVIAL,
                "with m:\n    work(1)",
                {"m": block, "work": work},
                baseline=BARE,
                floor=FLOOR,
                operation="meterage.bench.block",
            ),
        )
        coroutine = meterage.meter("meterage.bench.coroutine", probes=())(work_async)
        generator = meterage.meter("meterage.bench.generator", probes=())(work_items)
        subjects += [
            Subject(
                "bare.coroutine",
                "bare coroutine call, to its end",
                SECTION_STEPPED,
                _RUN_COROUTINE,
                {"f": work_async},
            ),
            Subject(
                "meterage.coroutine",
                "metered coroutine call, to its end",
                SECTION_STEPPED,
                _RUN_COROUTINE,
                {"f": coroutine},
                baseline="bare.coroutine",
                operation="meterage.bench.coroutine",
            ),
            Subject(
                "bare.generator",
                "bare generator, 16 items consumed",
                SECTION_STEPPED,
                _CONSUME_ITEMS,
                {"f": work_items},
            ),
            Subject(
                "meterage.generator",
                "metered generator, 16 items consumed",
                SECTION_STEPPED,
                _CONSUME_ITEMS,
                {"f": generator},
                baseline="bare.generator",
                operation="meterage.bench.generator",
            ),
            Subject(
                "floor.cpu",
                "floor: clock + cpu reading",
                SECTION_PROBES,
                "f(1)",
                {"f": _native.floor_wrap(work, ["cpu"])},
                baseline=BARE,
                floor="floor.cpu",
            ),
            Subject(
                "meterage.cpu",
                '@meterage.meter(probes=("cpu",), sample=1.0)',
                SECTION_PROBES,
                "f(1)",
                {"f": cpu},
                baseline=BARE,
                floor="floor.cpu",
                operation="meterage.bench.cpu",
            ),
        ]
    return subjects


class ProbedShare:
    """A note: the share of an operation's calls that ran the probes since ``mark()``."""

    def __init__(self, operation: str) -> None:
        self.operation = operation
        self.start: tuple[int, dict[str, int]] = (0, {})

    def _counts(self) -> tuple[int, dict[str, int]]:
        """Calls, and values held per probe histogram (one per probed call)."""
        import meterage

        for series in meterage.snapshot():
            if series.operation == self.operation and not series.attributes:
                histograms = series.histograms
                probed = {name: h.count for name, h in histograms.items() if name != "duration"}
                return histograms["duration"].count, probed
        return 0, {}

    def mark(self) -> None:
        """Counts from here on (the warm-up probed more calls while the rate settled)."""
        self.start = self._counts()

    def share(self) -> float | None:
        """The share of calls since ``mark()`` that ran the probes (None: no call since).

        Meters of one operation with other probes share its series: the probe histogram
        that grew most since ``mark()`` is the one these calls fed."""
        (calls, probed), (calls_then, probed_then) = self._counts(), self.start
        calls -= calls_then
        grown = max((n - probed_then.get(name, 0) for name, n in probed.items()), default=0)
        return grown / calls if calls > 0 else None

    def __call__(self) -> str:
        share = self.share()
        return f"probes ran on {share:.2%} of calls" if share is not None else ""


def ten_microsecond_subjects() -> list[Subject]:
    """A ~10 µs function bare and under ``@meterage.meter`` with its defaults."""
    import meterage
    from meterage import _native

    spin = ten_microsecond_function()
    # The first probe reading in a process pays one-time setup (the thread-CPU clock's
    # cost calibration, opening /proc/thread-self/io); done here so the adaptive sampler
    # of the meter under test starts from steady-state costs, as in a warmed-up service.
    _native.floor_wrap(work, list(ALL_PROBES))(1)
    metered = meterage.meter(DEFAULT_OPERATION)(spin)
    return [
        Subject(BARE_10US, "bare call", SECTION_10US, "f(1)", {"f": spin}),
        Subject(
            DEFAULT_10US,
            "@meterage.meter: all probes, 1% budget",
            SECTION_10US,
            "f(1)",
            {"f": metered},
            baseline=BARE_10US,
            operation=DEFAULT_OPERATION,
            note=ProbedShare(DEFAULT_OPERATION),
        ),
    ]


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):  # a parent is missing, or a stub module
        return False


def peers_available() -> dict[str, bool]:
    """Whether prometheus_client and the OpenTelemetry SDK can be imported."""
    return {
        "prometheus_client": _has_module("prometheus_client"),
        "opentelemetry-sdk": _has_module("opentelemetry.sdk.metrics"),
    }


LABELS = ("GET", "/items", "200")


def prometheus_subjects() -> list[Subject]:
    """prometheus_client's timing idioms around ``work``."""
    from time import perf_counter

    from prometheus_client import CollectorRegistry, Histogram

    # A private registry: a benchmark must not add series to the application's.
    registry = CollectorRegistry()
    plain = Histogram("meterage_bench_seconds", "bench", registry=registry)
    labelled = Histogram(
        "meterage_bench_labelled_seconds", "bench", ["method", "route", "status"], registry=registry
    )
    timing = {"work": work, "perf_counter": perf_counter}
    common: dict[str, Any] = {"baseline": BARE, "floor": FLOOR, "peer": True}
    return [
        Subject(
            "prometheus.decorator",
            "prometheus_client @Histogram.time()",
            SECTION_PEERS,
            "f(1)",
            {"f": plain.time()(work)},
            **common,
        ),
        Subject(
            "prometheus.with",
            "prometheus_client with Histogram.time()",
            SECTION_PEERS,
            "with h.time():\n    work(1)",
            {"h": plain, "work": work},
            **common,
        ),
        Subject(
            "prometheus.labels",
            "prometheus_client h.labels(3).observe(Δt)",
            SECTION_PEERS,
            "s = perf_counter(); work(1); h.labels(*labels).observe(perf_counter() - s)",
            {"h": labelled, "labels": LABELS, **timing},
            **common,
        ),
        Subject(
            "prometheus.child",
            "prometheus_client child.observe(Δt), labels bound once",
            SECTION_PEERS,
            "s = perf_counter(); work(1); child.observe(perf_counter() - s)",
            {"child": labelled.labels(*LABELS), **timing},
            **common,
        ),
    ]


def opentelemetry_subjects() -> list[Subject]:
    """The OpenTelemetry SDK: a perf_counter timer, Histogram.record and Counter.add."""
    from time import perf_counter

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    # Its own provider (not the global one), default views and exemplar filter: what a
    # user gets from the SDK out of the box.
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    otel_meter = provider.get_meter("meterage.bench")
    attributes = {"http.request.method": "GET", "http.route": "/items", "status": 200}
    return [
        Subject(
            "otel.record",
            "OTel SDK Histogram.record + Counter.add, 3 attrs",
            SECTION_PEERS,
            "s = perf_counter(); work(1)\nh.record(perf_counter() - s, a); c.add(1, a)",
            {
                "h": otel_meter.create_histogram("meterage.bench.duration", unit="s"),
                "c": otel_meter.create_counter("meterage.bench.calls"),
                "a": attributes,
                "work": work,
                "perf_counter": perf_counter,
                "_provider": provider,  # lives as long as the loop
            },
            baseline=BARE,
            floor=FLOOR,
            peer=True,
        )
    ]


def build_subjects(*, extended: bool = False, peers: bool = True) -> list[Subject]:
    """Every subject: meterage and its floor, the peers that are installed, the ~10 µs pair."""
    subjects = meterage_subjects(extended)
    if peers:
        available = peers_available()
        if available["prometheus_client"]:
            subjects += prometheus_subjects()
        if available["opentelemetry-sdk"]:
            subjects += opentelemetry_subjects()
    return subjects + ten_microsecond_subjects()


@dataclass
class Results:
    """Per-call samples (ns) of each subject, one per round; a subject's samples are
    aligned round by round with its baseline's."""

    subjects: dict[str, Subject]
    samples: dict[str, list[float]]

    def per_call(self, key: str) -> float:
        """Median ns per call."""
        return statistics.median(self.samples[key])

    def _pairs(self, key: str) -> Iterable[tuple[float, float]]:
        baseline = self.subjects[key].baseline
        assert baseline is not None, f"{key} has no baseline"
        return zip(self.samples[key], self.samples[baseline], strict=True)

    def overhead(self, key: str) -> float:
        """Median over rounds of (subject - baseline) ns per call."""
        if self.subjects[key].baseline is None:
            return 0.0
        return statistics.median(mine - base for mine, base in self._pairs(key))

    def relative_overhead(self, key: str) -> float:
        """Median over rounds of overhead / baseline (0.02 is 2%)."""
        if self.subjects[key].baseline is None:
            return 0.0
        return statistics.median((mine - base) / base for mine, base in self._pairs(key))

    def ratio(self, key: str, reference: str) -> float:
        """Overhead of ``key`` over the overhead of ``reference`` (inf if that is <= 0)."""
        below = self.overhead(reference)
        return self.overhead(key) / below if below > 0 else math.inf

    def merge(self, other: Results) -> Results:
        """These results plus ``other``'s subjects (another run, or a re-measurement)."""
        return Results({**self.subjects, **other.subjects}, {**self.samples, **other.samples})

    def resample(self, rng: random.Random) -> Results:
        """A bootstrap copy: rounds drawn with replacement, the same draw for every subject
        of one run so pairs stay paired (runs are told apart by their number of rounds;
        two runs sharing a draw is harmless, nothing pairs across them)."""
        draws: dict[int, list[int]] = {}
        samples = {}
        for key, values in self.samples.items():
            rounds = len(values)
            if rounds not in draws:
                draws[rounds] = [rng.randrange(rounds) for _ in range(rounds)]
            samples[key] = [values[index] for index in draws[rounds]]
        return Results(self.subjects, samples)


def measure(
    subjects: Sequence[Subject],
    *,
    rounds: int,
    batch_ms: float = 2.0,
    seed: int | None = None,
) -> Results:
    """Times every subject in ``rounds`` interleaved, shuffled rounds (see the module doc).

    A subject's baseline must be among ``subjects``.
    """
    by_key = {subject.key: subject for subject in subjects}
    for subject in subjects:
        if subject.baseline is not None and subject.baseline not in by_key:
            raise ValueError(f"{subject.key}: its baseline {subject.baseline} is not measured")
    for subject in subjects:
        subject.calibrate(batch_ms * 1e6)
        if isinstance(subject.note, ProbedShare):
            subject.note.mark()
    samples: dict[str, list[float]] = {subject.key: [] for subject in subjects}
    order = list(subjects)
    shuffle = random.Random(seed).shuffle
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection inside one batch would land on one subject only
    try:
        for _ in range(rounds):
            shuffle(order)
            for subject in order:
                samples[subject.key].append(subject.sample())
    finally:
        if was_enabled:
            gc.enable()
    return Results(by_key, samples)


def measure_all(
    subjects: Sequence[Subject], *, rounds: int, rounds_10us: int, batch_ms: float = 2.0
) -> Results:
    """The trivial-function subjects in one run, the ~10 µs pair in another."""
    long = [s for s in subjects if s.section == SECTION_10US]
    short = [s for s in subjects if s.section != SECTION_10US]
    results = Results({}, {})
    if short:
        results = results.merge(measure(short, rounds=rounds, batch_ms=batch_ms))
    if long:
        results = results.merge(measure(long, rounds=rounds_10us, batch_ms=batch_ms))
    return results


@dataclass(frozen=True)
class Goal:
    """A measured value that must stay on the right side of ``limit``."""

    key: str
    text: str
    subjects: tuple[str, ...]
    """Subjects that must be measured to evaluate the goal (baselines included)."""
    value: Callable[[Results], float]
    limit: float
    at_most: bool
    """True: value <= limit passes; False: value >= limit passes."""
    percent: bool = False

    def passes(self, value: float, limit: float | None = None) -> bool:
        """Whether ``value`` is on the right side of ``limit`` (the goal's own by default)."""
        limit = self.limit if limit is None else limit
        return value <= limit if self.at_most else value >= limit

    def format(self, value: float) -> str:
        if self.percent:
            return f"{value * 100:.2f}%"
        if math.isinf(value):
            return "inf"
        return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"

    def limit_text(self, limit: float | None = None) -> str:
        return ("≤ " if self.at_most else "≥ ") + self.format(
            self.limit if limit is None else limit
        )

    def interval(self, results: Results, *, draws: int = 200, seed: int = 0) -> tuple[float, float]:
        """A 90% bootstrap interval of the value: how much the rounds' noise moves it."""
        return bootstrap_interval(results, self.value, draws=draws, seed=seed)


def bootstrap_interval(
    results: Results, value: Callable[[Results], float], *, draws: int = 200, seed: int = 0
) -> tuple[float, float]:
    """A 90% bootstrap interval of ``value(results)``: rounds resampled with replacement
    (pairs kept together), ``value`` computed on each copy, the 5th and 95th percentiles."""
    rng = random.Random(seed)
    values = sorted(value(results.resample(rng)) for _ in range(draws))
    return values[int(0.05 * draws)], values[int(0.95 * draws) - 1]


def _peer_factor(peer_keys: Sequence[str]) -> Callable[[Results], float]:
    """The cheapest of the peer subjects' overheads, in multiples of timer-only's."""

    def value(results: Results) -> float:
        timer = results.overhead(TIMER)
        cheapest = min(results.overhead(key) for key in peer_keys)
        return cheapest / timer if timer > 0 else math.inf

    return value


def goals(subjects: Iterable[Subject]) -> list[Goal]:
    """The overhead goals (from the issue) that the measured ``subjects`` can evaluate."""
    keys = {subject.key for subject in subjects}
    found = [
        Goal(
            "timer",
            "timer-only overhead, in floor overheads",
            (BARE, FLOOR, TIMER),
            lambda r: r.ratio(TIMER, FLOOR),
            1.5,
            at_most=True,
        ),
        Goal(
            "full",
            "full probes (sample=1.0), in floor-with-probes overheads",
            (BARE, FLOOR_PROBES, FULL),
            lambda r: r.ratio(FULL, FLOOR_PROBES),
            1.15,
            at_most=True,
        ),
        Goal(
            "default",
            "default mode on the ~10 µs function",
            (BARE_10US, DEFAULT_10US),
            lambda r: r.relative_overhead(DEFAULT_10US),
            0.02,
            at_most=True,
            percent=True,
        ),
    ]
    # The peer idioms the issue names; child.observe with labels bound once is shown in
    # the table but is not how either library's timing helpers are used.
    for key, name, prefix, limit in (
        ("prometheus", "prometheus_client", "prometheus.", 10.0),
        ("otel", "OTel SDK", "otel.", 100.0),
    ):
        peer_keys = tuple(
            sorted(k for k in keys if k.startswith(prefix) and k != "prometheus.child")
        )
        if peer_keys:
            found.append(
                Goal(
                    key,
                    f"cheapest {name} idiom, in timer-only overheads",
                    (BARE, TIMER, *peer_keys),
                    _peer_factor(peer_keys),
                    limit,
                    at_most=False,
                )
            )
    return [goal for goal in found if keys.issuperset(goal.subjects)]


def machine_line() -> str:
    """Python, OS and CPU count: the context every table is printed with."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 0
    return (
        f"Python {platform.python_version()} ({sys.implementation.name}), "
        f"{platform.system()} {platform.release()} {platform.machine()}, {cpus} CPUs usable"
    )


def _ns(value: float) -> str:
    return f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"


def _factor(value: float) -> str:
    return f"{value:.2f}x" if value < 100 else f"{value:,.0f}x"


def format_table(results: Results) -> list[str]:
    """Per subject: ns per call, overhead over its bare call, and that overhead in
    multiples of the native floor's and (peers) of meterage timer-only's."""
    subjects = list(results.subjects.values())
    width = max(len(subject.label) for subject in subjects)
    header = (
        f"  {'subject':<{width}}  {'ns/call':>9}  {'overhead':>9}  {'vs floor':>9}"
        f"  {'vs meterage':>11}"
    )
    lines: list[str] = []
    section = None
    for subject in subjects:
        if subject.section != section:
            section = subject.section
            lines += ["", section, header]
        per_call = _ns(results.per_call(subject.key))
        overhead = versus_floor = versus_meterage = ""
        if subject.baseline is not None:
            if subject.section == SECTION_10US:
                overhead = f"{results.relative_overhead(subject.key) * 100:+.2f}%"
            else:
                overhead = "+" + _ns(results.overhead(subject.key))
        if subject.floor is not None and subject.floor in results.samples:
            versus_floor = _factor(results.ratio(subject.key, subject.floor))
        if subject.peer and TIMER in results.samples:
            versus_meterage = _factor(results.ratio(subject.key, TIMER))
        line = (
            f"  {subject.label:<{width}}  {per_call:>9}  {overhead:>9}  {versus_floor:>9}"
            f"  {versus_meterage:>11}"
        )
        note = subject.note() if subject.note is not None else ""
        lines.append(f"{line}  ({note})" if note else line.rstrip())
    return lines


def evaluate(goal: Goal, results: Results) -> tuple[float, tuple[float, float], bool]:
    """The goal's value, its 90% interval and whether it passes."""
    value = goal.value(results)
    return value, goal.interval(results), goal.passes(value)


def format_goal(goal: Goal, results: Results, width: int) -> str:
    """One line: the goal, its measured value and interval, the limit, pass or FAIL."""
    value, (low, high), passed = evaluate(goal, results)
    interval = f"[{goal.format(low)}, {goal.format(high)}]"
    return (
        f"  {goal.text:<{width}}  {goal.format(value):>7}  {interval:<17}  "
        f"{goal.limit_text():>8}  {'pass' if passed else 'FAIL'}"
    )


def format_goals(results: Results, checked: Sequence[Goal]) -> list[str]:
    """The goals section: one line per goal, with a header."""
    width = max((len(goal.text) for goal in checked), default=4)
    header = f"  {'goal':<{width}}  {'value':>7}  {'90% interval':<17}  {'limit':>8}  verdict"
    return [header, *(format_goal(goal, results, width) for goal in checked)]
