"""Multiprocess metrics, measured: meterage's multiprocess mode next to prometheus_client's.

    python benches/multiprocess_peers.py               # ~8 min: the table for docs/benchmarks.md
    python benches/multiprocess_peers.py --quick       # ~20 s, smaller numbers (says so)
    python benches/multiprocess_peers.py --json        # the raw numbers instead of the table
    python benches/multiprocess_peers.py --save r.json # the table, and the raw numbers in r.json
    python benches/multiprocess_peers.py --table r.json            # the table of saved numbers
    python benches/multiprocess_peers.py --subject prometheus_client   # one subject only

Each subject is a library in its multiprocess mode (see ``MultiprocessSubject``):
prometheus_client with ``PROMETHEUS_MULTIPROC_DIR``, and meterage with
``METERAGE_MULTIPROCESS=1`` (skipped, with a line saying so, where this build of meterage
has no ``meterage.multiprocess``). What is measured, in one run:

1. **Per call**, single-process next to multiprocess: a histogram observation and a counter
   increment on a series bound once, an observation that resolves its labels per call, and
   a metered function (timer only; meterage also with all probes on every call). The method
   is ``meterage.cli.overhead``'s: each statement unrolled in a loop, interleaved rounds in
   an order shuffled per round, the garbage collector off during the rounds; a figure is
   the median over rounds of the statement's time minus its baseline's in the same round
   (an empty statement; the bare call ``work(1)`` for metered functions), and
   "multiprocess - single-process" is the median of the per-round differences.
   prometheus_client times both modes in one process (see below). meterage's mode is a
   process's: a root process started with or without the switch forks the process that
   measures (as gunicorn's master forks a worker), and the two measuring processes run
   their rounds in lockstep, one round each in turn, in an order drawn per round; that is
   repeated with ``pairs`` fresh pairs of processes (one process can run a wrapper
   consistently slower than the next: docs/benchmarks.md), and the figures are the medians
   over pairs. Afterwards each root checks that it sees (multiprocess) or does not see
   (single-process) the counts its worker recorded.
2. **Scrape**: a fresh process (the group's root, as gunicorn's master) forks ``workers``
   workers, which each record twice into each of the same ``series`` series (one
   histogram, a ``route`` label with ``series`` values) and stay alive; the root times its
   scrape (median of several; the garbage collector on, as in a server, after a
   ``gc.collect()``), measures the shared state and reads the scrape back (series,
   observations, live workers). Then the workers exit, the exit hook runs for each, and the
   same again. prometheus_client's scrape is ``generate_latest`` of a registry holding its
   ``MultiProcessCollector``; meterage's is ``meterage.snapshot()`` and, timed separately,
   the Prometheus text of the group through the OpenTelemetry bridge
   (``PrometheusMetricReader``, ``meterage.otel.attach``, ``generate_latest``).
3. **After restarts**: another fresh root with ``workers`` long-lived workers as above, then
   one short-lived process, then ``restarts - 1`` more (``parallel`` at a time), each
   recording into the same series and exiting, as gunicorn's ``max_requests`` restarts do.
   The scrape is timed after the first and after the last, with no exit hook having run
   (as for users who do not set one); then the hook (prometheus_client:
   ``multiprocess.mark_process_dead(pid)``, what its docs put in gunicorn's ``child_exit``;
   meterage needs none) runs for every process that exited, and the scrape is timed again.
   Running the hook late leaves the directory as running it at each exit would: it only
   deletes files named after the dead pid.

The shared state is the files in ``PROMETHEUS_MULTIPROC_DIR``, or meterage's group segment
in ``/dev/shm`` (``meterage.multiprocess.group().path``: ``meterage-<uid>-<root pid>-...``);
both are sparse, so the bytes they hold (``st_blocks * 512``) are given first and their
apparent size after. ``benches/multiprocess_overhead.py`` is meterage's own per-call gate
(its processes of both modes started at once); this script puts the peer beside it.

Live workers: each prometheus_client worker sets, once at its start, an unlabelled gauge
with ``multiprocess_mode="livesum"`` (the kind of metric ``mark_process_dead`` acts on);
each meterage worker holds one call of ``bench.mp.worker`` in flight for its whole life and
exits (``os._exit``) inside it, as a killed process would, so ``meterage.calls.active`` of
that operation counts the live workers. The scrape's reading shows whether dead processes
are still counted.

prometheus_client picks its value class when it is imported (``PROMETHEUS_MULTIPROC_DIR``
set or not); to time both modes in one process, its single-process metrics are made with
``values.MutexValue`` and its multiprocess ones with a fresh ``values.MultiProcessValue()``,
as its own tests do. Workers make their metrics after the fork, as an application imported
in a gunicorn worker (no ``--preload``) does.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Protocol


def _load_overhead() -> ModuleType:
    """``meterage.cli.overhead``: from meterage if it imports (its extension built), else
    from the source tree (the module itself needs only the standard library)."""
    try:
        from meterage.cli import overhead
    except ImportError:
        path = Path(__file__).resolve().parents[1] / "python" / "meterage" / "cli" / "overhead.py"
        spec = importlib.util.spec_from_file_location("_meterage_overhead", path)
        if spec is None or spec.loader is None:
            raise
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    return overhead


STARTED = time.time()
"""When this process started measuring (before it imported meterage)."""

# Imports meterage: a process started with METERAGE_MULTIPROCESS=1 is in its multiprocess
# mode from here on.
overhead = _load_overhead()

VALUE = 0.03
"""What every histogram observation records (prometheus_client's default buckets: le=0.05)."""

SINGLE, MULTI = "single", "multi"
MODES = (SINGLE, MULTI)
NOTHING, BARE = "nothing", "bare"
"""The baselines: an empty statement, and the bare call ``work(1)``."""

BASELINES = {NOTHING: "pass", BARE: "work(1)"}


@dataclass(frozen=True)
class Operation:
    text: str
    baseline: str
    """``NOTHING`` or ``BARE``: what the statement's time is taken relative to."""


OPERATIONS = {
    "observe": Operation("histogram observation, series bound once", NOTHING),
    "inc": Operation("counter increment, series bound once", NOTHING),
    "labels.observe": Operation("histogram observation, labels resolved per call", NOTHING),
    "timer": Operation("metered function, timer only", BARE),
    "full": Operation("metered function, all probes on every call", BARE),
}
"""The per-call statements; a subject provides those it has, in both modes."""


@dataclass(frozen=True)
class Plan:
    series: int
    workers: int
    restarts: int
    parallel: int
    rounds: int
    """Interleaved per-call rounds (per pair of processes, where there are pairs)."""
    pairs: int
    """Fresh pairs of processes, for subjects whose per-call modes need a process each."""
    scrapes: int
    """Scrapes timed per state with ``workers`` processes' data, and after one restart."""
    scrapes_after_restarts: int
    """Scrapes timed per state after the restarts (each can take tens of seconds)."""
    quick: bool = False


FULL = Plan(
    series=1_000,
    workers=16,
    restarts=1_000,
    parallel=4,
    rounds=300,
    pairs=5,
    scrapes=7,
    scrapes_after_restarts=3,
)
QUICK = Plan(
    series=250,
    workers=16,
    restarts=100,
    parallel=4,
    rounds=40,
    pairs=1,
    scrapes=3,
    scrapes_after_restarts=3,
    quick=True,
)


@dataclass
class Footprint:
    files: int
    bytes: int
    """Sum of the files' apparent sizes (both subjects' files are sparse)."""
    allocated: int
    """Sum of the blocks the files hold (``st_blocks * 512``)."""
    names: list[str] = field(default_factory=list)
    """The files' names, where there are few (meterage's segment)."""


def _footprint(paths: Sequence[str]) -> Footprint:
    files = size = allocated = 0
    for path in paths:
        try:
            status = os.lstat(path)
        except FileNotFoundError:
            continue
        files += 1
        size += status.st_size
        allocated += status.st_blocks * 512
    return Footprint(files, size, allocated)


def directory_footprint(path: str) -> Footprint:
    """Files, bytes and allocated bytes under ``path``."""
    return _footprint(
        [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    )


@dataclass
class Statement:
    """One per-call statement and the names it uses (they become fast locals)."""

    code: str
    namespace: dict[str, Any]


@dataclass
class Scrape:
    """One scrape: how long each of its parts took, and what it returned."""

    seconds: dict[str, float]
    """Part (a key of the subject's ``scrape_parts``) -> seconds."""
    text: bytes
    """The Prometheus text exposition served for the group (empty if there is none)."""
    data: Any = None
    """Whatever else the subject's ``read_back`` needs (meterage: the snapshot)."""


@dataclass
class ReadBack:
    """What a scrape says: whether it holds what the workers recorded."""

    series: int
    observations: float
    live_workers: float | None = None
    """The live-workers reading as scraped; None where the subject has none."""
    note: str | None = None
    """Where two readings of one scrape disagree, what the other said."""


class MultiprocessSubject(Protocol):
    """A library in its multiprocess mode, as this benchmark drives it.

    Per call: ``measure_per_call(plan, progress)``, in the parent (see
    ``measure_in_process`` and ``measure_in_processes``). The rest runs in a fresh root
    process per group, started with ``environment()``: ``setup_group(directory)``; for
    every worker, after ``os.fork()``: ``worker_start()``, ``record(i)`` for each series
    index, twice, ``worker_stop()`` just before ``os._exit(0)``; in the root:
    ``process_exited(pid)`` (the exit hook, if ``exit_hook`` is not None), ``scrape()``,
    ``read_back(scrape)``, ``footprint()``; ``teardown_group()`` at the end.
    """

    name: str
    """The table's column header, and the name ``--subject`` takes."""
    version: str
    exit_hook: str | None
    """What ``process_exited`` does, in words; None: the subject needs no exit hook."""
    switch: str
    """What turns the multiprocess mode on, in words."""
    idioms: dict[str, str]
    """Operation -> the code timed for it (operations the subject has)."""
    scrape_parts: dict[str, str]
    """What ``scrape`` times, by part: key -> words. ``"text"`` is the Prometheus text."""

    def environment(self) -> dict[str, str | None]:
        """Variables to set (None: to remove) for a root process of its multiprocess mode."""

    def measure_per_call(self, plan: Plan, progress: Callable[[str], None]) -> dict[str, Any]:
        """Operation -> figures (see ``summarise``), for every operation it has."""

    def setup_group(self, directory: str) -> None:
        """In the root: points the library at a fresh, empty ``directory`` if it needs one,
        and sets up its scrape."""

    def worker_start(self) -> None:
        """In a freshly forked worker: what an application does at import (make its
        metrics), and count this worker among the live ones, if the subject can."""

    def record(self, series_index: int) -> None:
        """One observation of ``VALUE`` into series ``series_index`` (0 .. series-1),
        resolving its labels as a request handler does."""

    def worker_stop(self) -> None:
        """Just before the worker's ``os._exit(0)`` (a flush, if the subject needs one)."""

    def process_exited(self, pid: int) -> None:
        """In the root, for a worker that exited: gunicorn's ``child_exit`` hook."""

    def scrape(self) -> Scrape:
        """In the root: what an endpoint would serve for the whole group, timed."""

    def read_back(self, scrape: Scrape) -> ReadBack:
        """What a scrape says of the workers' histogram and live workers."""

    def footprint(self) -> Footprint:
        """The shared state's files and bytes."""

    def teardown_group(self) -> None:
        """Closes what ``setup_group`` opened."""


def route(index: int) -> str:
    return f"/route/{index:04d}"


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


# -- per call ---------------------------------------------------------------------------


def _summarise_pair(
    samples: dict[str, dict[str, list[float]]], operations: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """One run's figures per operation. ``samples``: mode -> statement key (an operation or
    a baseline) -> ns per call, one per round, rounds aligned across modes."""
    found = {}
    for operation in operations:
        baseline = OPERATIONS[operation].baseline
        overheads = {
            mode: [
                mine - base
                for mine, base in zip(
                    samples[mode][operation], samples[mode][baseline], strict=True
                )
            ]
            for mode in MODES
        }
        single = statistics.median(overheads[SINGLE])
        multi = statistics.median(overheads[MULTI])
        found[operation] = {
            "single_ns": single,
            "multi_ns": multi,
            "difference_ns": statistics.median(
                m - s for m, s in zip(overheads[MULTI], overheads[SINGLE], strict=True)
            ),
            "ratio": multi / single if single > 0 else None,
            "overheads_ns": overheads,
        }
    return found


def summarise(
    pairs: Sequence[dict[str, dict[str, list[float]]]], operations: Sequence[str]
) -> dict[str, Any]:
    """Operation -> figures: medians over the pairs (one pair: that pair's figures), each
    pair's own figures under ``pairs``."""
    each = [_summarise_pair(samples, operations) for samples in pairs]
    found: dict[str, Any] = {}
    for operation in operations:
        figures = [pair[operation] for pair in each]
        ratios = [figure["ratio"] for figure in figures if figure["ratio"] is not None]
        found[operation] = {
            key: statistics.median(figure[key] for figure in figures)
            for key in ("single_ns", "multi_ns", "difference_ns")
        }
        found[operation]["ratio"] = statistics.median(ratios) if ratios else None
        found[operation]["pairs"] = figures
    return found


def measure_in_process(
    statements: dict[tuple[str, str], Statement], rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Both modes' statements and the baselines in one interleaved run of this process;
    mode -> key -> samples, as ``summarise`` takes them."""
    timed = [
        overhead.Subject(key, key, "multiprocess", code, {"work": overhead.work})
        for key, code in BASELINES.items()
    ]
    timed += [
        overhead.Subject(f"{operation}:{mode}", operation, "multiprocess", s.code, s.namespace)
        for (operation, mode), s in statements.items()
    ]
    results = overhead.measure(timed, rounds=rounds, batch_ms=2.0)
    return {
        mode: {
            **{key: results.samples[key] for key in BASELINES},
            **{
                operation: results.samples[f"{operation}:{mode}"]
                for operation, statement_mode in statements
                if statement_mode == mode
            },
        }
        for mode in MODES
    }


def _script_command(*arguments: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *arguments]


def _environment_for(changes: dict[str, str | None]) -> dict[str, str]:
    environment = dict(os.environ)
    for name, value in changes.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return environment


class _PerCallProcess:
    """A root process of one mode and the worker it forked, which times the statements a
    round at a time when told (``per_call_child`` is the other side)."""

    def __init__(self, subject: str, mode: str, environment: dict[str, str | None]) -> None:
        self.mode = mode
        self.process = subprocess.Popen(
            _script_command("--per-call-child", subject, mode),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_environment_for(environment),
            text=True,
            bufsize=1,
        )

    def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            status = self.process.wait()
            raise RuntimeError(f"the {self.mode} per-call process exited (status {status})")
        found: dict[str, Any] = json.loads(line)
        if "error" in found:
            raise RuntimeError(f"the {self.mode} per-call process failed:\n{found['error']}")
        return found

    def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def measure_in_processes(
    subject: MultiprocessSubject, operations: Sequence[str], plan: Plan, progress: Any
) -> dict[str, Any]:
    """A subject whose mode is a process's: ``plan.pairs`` pairs of fresh processes, one
    per mode, run ``plan.rounds`` rounds in lockstep (see the module doc)."""
    pairs = []
    draw = random.Random(1)
    checks: list[dict[str, Any]] = []
    for pair in range(plan.pairs):
        progress(f"{subject.name}: per call, pair {pair + 1} of {plan.pairs}")
        environments = {
            SINGLE: {name: None for name in subject.environment()},
            MULTI: subject.environment(),
        }
        children = {mode: _PerCallProcess(subject.name, mode, environments[mode]) for mode in MODES}
        try:
            for mode, child in children.items():
                here = child.receive()["multiprocess"]  # calibrated, waiting
                if here is not None and here != (mode == MULTI):
                    raise RuntimeError(
                        f"{subject.name}: the {mode} per-call worker is "
                        f"{'in' if here else 'not in'} multiprocess mode"
                    )
            samples: dict[str, dict[str, list[float]]] = {mode: {} for mode in MODES}
            order = list(MODES)
            for _ in range(plan.rounds):
                draw.shuffle(order)
                for mode in order:
                    for key, value in children[mode].ask("round").items():
                        samples[mode].setdefault(key, []).append(value)
            for mode, child in children.items():
                worker = child.ask("end")
                root = child.receive()
                checks.append({"mode": mode, **worker, **root})
                expected = worker["recorded"] if mode == MULTI else 0
                if root["root_sees"] != expected:
                    raise RuntimeError(
                        f"{subject.name}: the {mode} root sees {root['root_sees']} of the "
                        f"{worker['recorded']} counts its worker recorded (expected {expected}):"
                        " is the multiprocess mode on, and only there?"
                    )
        finally:
            for child in children.values():
                child.close()
        pairs.append(samples)
    found = summarise(pairs, operations)
    found["checks"] = checks
    return found


def per_call_child(subject_name: str, mode: str) -> int:
    """``--per-call-child``: a root of ``mode`` (its environment set by the parent) that
    forks the worker timing the statements; the root then reports what it sees."""
    subject: Any = make_subject(subject_name)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            _per_call_worker(subject, mode)
            status = 0
        except BaseException:
            with contextlib.suppress(BaseException):
                print(json.dumps({"error": traceback.format_exc()}), flush=True)
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        return 1
    print(json.dumps({"root_sees": subject.recorded()}), flush=True)
    return 0


def _per_call_worker(subject: Any, mode: str) -> None:
    statements = subject.per_call_statements(mode)
    timed = [
        overhead.Subject(key, key, "multiprocess", code, {"work": overhead.work})
        for key, code in BASELINES.items()
    ]
    timed += [
        overhead.Subject(operation, operation, "multiprocess", s.code, s.namespace)
        for operation, s in statements.items()
    ]
    for statement in timed:
        statement.calibrate(2e6)
    order = list(timed)
    shuffle = random.Random().shuffle
    gc.collect()
    gc.disable()  # as overhead.measure does; nothing else runs here between rounds
    here = getattr(subject, "multiprocess_here", lambda: None)()
    print(json.dumps({"multiprocess": here}), flush=True)
    for line in sys.stdin:
        if line.strip() == "end":
            break
        shuffle(order)
        samples = {}
        for statement in order:
            samples[statement.key] = statement.sample()
        print(json.dumps(samples), flush=True)
    gc.enable()
    print(json.dumps({"recorded": subject.recorded_here()}), flush=True)


# -- subjects ---------------------------------------------------------------------------


class PrometheusSubject:
    """prometheus_client in multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR``, one mmap file
    per process and metric type, ``MultiProcessCollector`` reading them all per scrape."""

    name = "prometheus_client"
    exit_hook = "`multiprocess.mark_process_dead(pid)`"
    switch = "`PROMETHEUS_MULTIPROC_DIR`, and a registry with a `MultiProcessCollector`"
    idioms: ClassVar[dict[str, str]] = {
        "observe": "child.observe(v)",
        "inc": "child.inc()",
        "labels.observe": "h.labels(route=r).observe(v)",
        "timer": "@child.time()",
    }
    scrape_parts: ClassVar[dict[str, str]] = {
        "text": "`generate_latest` of the `MultiProcessCollector`"
    }

    def __init__(self) -> None:
        from importlib.metadata import version

        self.version = version("prometheus-client")
        self.directory: str | None = None
        self._environment: contextlib.ExitStack | None = None
        self._value_classes: list[Any] = []
        self._histogram: Any = None
        self._routes: list[str] = []

    def environment(self) -> dict[str, str | None]:
        return {}  # setup_group points it at its directory

    @staticmethod
    @contextlib.contextmanager
    def _value_class(value_class: Any) -> Iterator[None]:
        from prometheus_client import values

        saved = values.ValueClass
        values.ValueClass = value_class
        try:
            yield
        finally:
            values.ValueClass = saved

    def setup_group(self, directory: str) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        self.directory = directory
        self._environment = contextlib.ExitStack()
        self._environment.enter_context(_environment("PROMETHEUS_MULTIPROC_DIR", directory))
        # As the docs have it: a registry of its own, with the collector only.
        self._registry = CollectorRegistry()
        MultiProcessCollector(self._registry, path=directory)

    def _metrics(self) -> tuple[Any, Any]:
        from prometheus_client import Counter, Histogram

        # registry=None: in multiprocess mode the scrape reads the files, not objects.
        histogram = Histogram("app_request_seconds", "Request time", ["route"], registry=None)
        counter = Counter("app_requests", "Requests", ["route"], registry=None)
        return histogram, counter

    def per_call_statements(self) -> dict[tuple[str, str], Statement]:
        """``(operation, mode)`` -> statement, both modes in this process (see the module
        doc); the multiprocess ones record into the directory of ``setup_group``."""
        from prometheus_client import values

        multiprocess = values.MultiProcessValue()
        self._value_classes.append(multiprocess)
        statements = {}
        for mode, value_class in ((SINGLE, values.MutexValue), (MULTI, multiprocess)):
            with self._value_class(value_class):
                histogram, counter = self._metrics()
                observed = histogram.labels(route=route(0))
                counted = counter.labels(route=route(0))
            for child in (observed._sum, counted._value):
                assert child._multiprocess is (mode == MULTI), "the wrong value class"
            statements[("observe", mode)] = Statement("h.observe(v)", {"h": observed, "v": VALUE})
            statements[("inc", mode)] = Statement("c.inc()", {"c": counted})
            statements[("labels.observe", mode)] = Statement(
                "h.labels(route=r).observe(v)", {"h": histogram, "r": route(0), "v": VALUE}
            )
            statements[("timer", mode)] = Statement("f(1)", {"f": observed.time()(overhead.work)})
        return statements

    def measure_per_call(self, plan: Plan, progress: Callable[[str], None]) -> dict[str, Any]:
        progress(f"{self.name}: per call, {plan.rounds} interleaved rounds in one process")
        directory = tempfile.mkdtemp(prefix="meterage-mp-bench-")
        self.setup_group(directory)
        try:
            statements = self.per_call_statements()
            samples = measure_in_process(statements, plan.rounds)
            # The multiprocess statements must really have written to the directory.
            found = self.read_back(self.scrape())
            assert found.observations > 0, f"{self.name}: nothing recorded in multiprocess mode"
        finally:
            self.teardown_group()
            shutil.rmtree(directory, ignore_errors=True)
        return summarise([samples], list(self.idioms))

    def worker_start(self) -> None:
        from prometheus_client import Gauge, values

        values.ValueClass = values.MultiProcessValue()  # as if imported after the fork
        self._histogram, _ = self._metrics()
        self._routes = [route(index) for index in range(FULL.series)]
        workers = Gauge("app_workers", "Live workers", registry=None, multiprocess_mode="livesum")
        workers.set(1)

    def record(self, series_index: int) -> None:
        self._histogram.labels(route=self._routes[series_index]).observe(VALUE)

    def worker_stop(self) -> None:
        pass  # every write is already in the process's mmap file

    def process_exited(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.directory)

    def scrape(self) -> Scrape:
        from prometheus_client import generate_latest

        started = time.perf_counter()
        text = generate_latest(self._registry)
        return Scrape({"text": time.perf_counter() - started}, text)

    def read_back(self, scrape: Scrape) -> ReadBack:
        from prometheus_client.parser import text_string_to_metric_families

        series = 0
        observations = live = 0.0  # no gauge in the scrape: no live worker counted
        for family in text_string_to_metric_families(scrape.text.decode()):
            for sample in family.samples:
                if sample.name == "app_request_seconds_count":
                    series += 1
                    observations += sample.value
                elif sample.name == "app_workers":
                    live += sample.value
        return ReadBack(series, observations, live)

    def footprint(self) -> Footprint:
        assert self.directory is not None
        return directory_footprint(self.directory)

    def teardown_group(self) -> None:
        for value_class in self._value_classes:
            value_class.close_all_files()
        self._value_classes.clear()
        if self._environment is not None:
            self._environment.close()
        self._environment = None
        self.directory = None


GROUP_VARIABLES = ("METERAGE_MULTIPROCESS", "METERAGE_GROUP")
"""What makes a process a member of a meterage group, or its root (meterage.multiprocess)."""

SEGMENTS = "/dev/shm"
"""Where meterage keeps a group's segment (``meterage-<uid>-<root pid>-<start>``)."""


def _segment_names() -> set[str]:
    prefix = f"meterage-{os.getuid()}-"
    try:
        return {name for name in os.listdir(SEGMENTS) if name.startswith(prefix)}
    except OSError:
        return set()


class MeterageSubject:
    """meterage in multiprocess mode: ``METERAGE_MULTIPROCESS=1`` in the root before
    ``import meterage``; fork children join its group; the series live in one shared
    segment, and any member's ``meterage.snapshot()`` sums the group's."""

    name = "meterage"
    exit_hook = None
    switch = "`METERAGE_MULTIPROCESS=1` before `import meterage`"
    idioms: ClassVar[dict[str, str]] = {
        "observe": "h.bind(attributes).record(v)",
        "inc": "c.bind(attributes).add()",
        "labels.observe": 'h.record(v, {"route": r})',
        "timer": '@meterage.meter("…", probes=())',
        "full": f'@meterage.meter("…", probes={overhead.ALL_PROBES}, sample=1.0)',
    }
    scrape_parts: ClassVar[dict[str, str]] = {
        "snapshot": "`meterage.snapshot()`",
        "text": "Prometheus text through the OpenTelemetry bridge",
    }
    HISTOGRAM = "app.request.duration"
    HISTOGRAM_TEXT = "app_request_duration_seconds_count"
    LIVE = "bench.mp.worker"
    COUNTER = "bench.mp.counter"

    def __init__(self) -> None:
        from importlib.metadata import version

        self.version = version("meterage")
        self.text_missing: str | None = None
        if importlib.util.find_spec("opentelemetry.exporter.prometheus") is None:
            self.text_missing = (
                "meterage: no Prometheus text (pip install opentelemetry-exporter-prometheus);"
                " snapshot() only"
            )
        self._provider: Any = None
        self._registry: Any = None
        self._root = os.getpid()
        self._counter: Any = None
        self._histogram: Any = None
        self._routes: list[str] = []
        self._live: Any = None

    def environment(self) -> dict[str, str | None]:
        # A process names its own group unless an ancestor with the switch, or the
        # group in METERAGE_GROUP, does (meterage.multiprocess): neither is left to chance.
        return {"METERAGE_MULTIPROCESS": "1", "METERAGE_GROUP": None}

    def multiprocess_here(self) -> bool | None:
        """Whether this process is in a group, if this build can say."""
        import meterage.multiprocess

        is_enabled = getattr(meterage.multiprocess, "is_enabled", None)
        return None if is_enabled is None else bool(is_enabled())

    def per_call_statements(self, mode: str) -> dict[str, Statement]:
        """In the process that times them (its root in ``mode``): operation -> statement."""
        import meterage

        timer = meterage.meter("bench.mp.timer", probes=())(overhead.work)
        full = meterage.meter("bench.mp.full", probes=overhead.ALL_PROBES, sample=1.0)(
            overhead.work
        )
        histogram = meterage.histogram("bench.mp.histogram", unit="s")
        self._counter = meterage.counter(self.COUNTER).bind({"route": route(0)})
        return {
            "observe": Statement(
                "h.record(v)", {"h": histogram.bind({"route": route(0)}), "v": VALUE}
            ),
            "inc": Statement("c.add()", {"c": self._counter}),
            "labels.observe": Statement(
                'h.record(v, {"route": r})', {"h": histogram, "r": route(0), "v": VALUE}
            ),
            "timer": Statement("f(1)", {"f": timer}),
            "full": Statement("f(1)", {"f": full}),
        }

    def recorded_here(self) -> float:
        """The per-call worker's counter, as it sees it."""
        return float(self._counter.value())

    def recorded(self) -> float:
        """The per-call counter in the root's snapshot, after its worker exited."""
        import meterage

        return float(sum(s.value for s in meterage.snapshot() if s.name == self.COUNTER))

    def measure_per_call(self, plan: Plan, progress: Callable[[str], None]) -> dict[str, Any]:
        return measure_in_processes(self, list(self.idioms), plan, progress)

    def setup_group(self, directory: str) -> None:
        del directory  # meterage's group needs none
        self._root = os.getpid()
        if self.text_missing is None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from opentelemetry.sdk.metrics import MeterProvider
            from prometheus_client import REGISTRY, CollectorRegistry

            import meterage.otel

            registry = CollectorRegistry()
            try:
                reader = PrometheusMetricReader(registry=registry)
            except TypeError:  # before opentelemetry-exporter-prometheus 0.5xb0
                reader, registry = PrometheusMetricReader(), REGISTRY
            self._registry = registry
            self._provider = MeterProvider(metric_readers=[reader])
            # As a gunicorn.conf.py would, in the master: also turns on calls-in-flight.
            meterage.otel.attach(self._provider, process=False)

    def worker_start(self) -> None:
        import meterage

        self._histogram = meterage.histogram(self.HISTOGRAM, unit="s")
        self._routes = [route(index) for index in range(FULL.series)]
        # One call in flight for the worker's whole life: it never ends (see the module doc).
        self._live = meterage.meter(self.LIVE, probes=()).__enter__()

    def record(self, series_index: int) -> None:
        self._histogram.record(VALUE, {"route": self._routes[series_index]})

    def worker_stop(self) -> None:
        pass  # nothing to flush: the series are in the group's segment

    def process_exited(self, pid: int) -> None:
        raise AssertionError("meterage needs no exit hook")

    def scrape(self) -> Scrape:
        import meterage

        started = time.perf_counter()
        snapshot = meterage.snapshot()
        seconds = {"snapshot": time.perf_counter() - started}
        text = b""
        if self._registry is not None:
            from prometheus_client import generate_latest

            started = time.perf_counter()
            text = generate_latest(self._registry)
            seconds["text"] = time.perf_counter() - started
        return Scrape(seconds, text, snapshot)

    def read_back(self, scrape: Scrape) -> ReadBack:
        histograms = [s for s in scrape.data if s.name == self.HISTOGRAM]
        live = [s.active for s in scrape.data if s.kind == "call" and s.operation == self.LIVE]
        counted = [active for active in live if active is not None]
        found = ReadBack(
            len(histograms),
            float(sum(s.count for s in histograms)),
            float(sum(counted)) if counted or not live else None,
        )
        if not scrape.text:
            return found
        from prometheus_client.parser import text_string_to_metric_families

        text = ReadBack(0, 0.0, 0.0)
        for family in text_string_to_metric_families(scrape.text.decode()):
            for sample in family.samples:
                if sample.name == self.HISTOGRAM_TEXT:
                    text.series += 1
                    text.observations += sample.value
                elif sample.name == "meterage_calls_active" and (
                    sample.labels.get("meterage_operation") == self.LIVE
                ):
                    assert text.live_workers is not None
                    text.live_workers += sample.value
        if asdict(text) != asdict(found):
            live = "n/a" if found.live_workers is None else f"{found.live_workers:,.0f}"
            text.note = (
                f"snapshot(): {found.series:,} series, {found.observations:,.0f} observations,"
                f" {live} live"
            )
        return text

    def footprint(self) -> Footprint:
        import meterage.multiprocess

        group = getattr(meterage.multiprocess, "group", lambda: None)()
        if group is not None and getattr(group, "path", None):
            found = _footprint([group.path])
            found.names = [os.path.basename(group.path)]
            return found
        prefix = f"meterage-{os.getuid()}-{self._root}-"
        paths = [
            os.path.join(SEGMENTS, name) for name in _segment_names() if name.startswith(prefix)
        ]
        if not paths:  # named otherwise than expected: the segments made since this started
            paths = [
                path
                for path in (os.path.join(SEGMENTS, name) for name in _segment_names())
                if os.stat(path).st_ctime >= STARTED - 1
            ]
        found = _footprint(sorted(paths))
        found.names = [os.path.basename(path) for path in sorted(paths)]
        return found

    def teardown_group(self) -> None:
        if self._provider is not None:
            import meterage.otel

            meterage.otel.detach(self._provider)
            self._provider.shutdown()
        self._provider = self._registry = None


SUBJECTS: dict[str, type[Any]] = {
    MeterageSubject.name: MeterageSubject,
    PrometheusSubject.name: PrometheusSubject,
}


def make_subject(name: str) -> MultiprocessSubject:
    subject: MultiprocessSubject = SUBJECTS[name]()
    return subject


def missing_reason(name: str) -> str | None:
    """Why a subject cannot run here, in a line; None if it can."""
    if name == MeterageSubject.name:
        if importlib.util.find_spec("meterage") is None:
            return "meterage: not installed (pip install -e .); no column"
        try:
            import meterage  # noqa: F401
        except ImportError as error:
            return f"meterage: does not import ({error}); no column"
        if importlib.util.find_spec("meterage.multiprocess") is None:
            return (
                "meterage: no multiprocess mode in this build (no meterage.multiprocess); no column"
            )
        return None
    if importlib.util.find_spec("prometheus_client") is None:
        return "prometheus_client: not installed (pip install prometheus-client); no column"
    return None


def build_subjects(names: Sequence[str]) -> tuple[list[MultiprocessSubject], list[str]]:
    """The subjects of ``names`` that can run here, and a line for each that cannot."""
    subjects: list[MultiprocessSubject] = []
    missing: list[str] = []
    for name in names:
        reason = missing_reason(name)
        if reason is None:
            subjects.append(make_subject(name))
        else:
            missing.append(reason)
    for subject in subjects:
        if getattr(subject, "text_missing", None):
            missing.append(subject.text_missing)  # type: ignore[attr-defined]
    return subjects, missing


# -- processes ------------------------------------------------------------------------


@dataclass
class Worker:
    pid: int
    report: int
    """Read end of the pipe the worker reports on."""


def _worker(
    subject: MultiprocessSubject, series: int, report: int, release: int | None, close: list[int]
) -> None:
    """A worker's life, after the fork; never returns."""
    status = 1
    try:
        for fd in close:
            os.close(fd)
        subject.worker_start()
        started = time.process_time()
        for index in range(series):
            subject.record(index)
        first = time.process_time() - started
        started = time.process_time()
        for index in range(series):
            subject.record(index)
        again = time.process_time() - started
        os.write(report, json.dumps({"first_s": first, "again_s": again}).encode() + b"\n")
        if release is not None:
            os.read(release, 1)  # blocks until the root closes the other end: EOF
        subject.worker_stop()
        status = 0
    except BaseException:
        with contextlib.suppress(BaseException):
            os.write(report, json.dumps({"error": traceback.format_exc()}).encode() + b"\n")
    finally:
        os._exit(status)


class Group:
    """Processes sharing one fresh group: long-lived workers, short-lived restarts."""

    def __init__(self, subject: MultiprocessSubject, series: int) -> None:
        self.subject = subject
        self.series = series
        self.directory = tempfile.mkdtemp(prefix="meterage-mp-bench-")
        subject.setup_group(self.directory)
        self.release_read, self.release_write = os.pipe()
        self.alive: list[Worker] = []
        self.exited: list[int] = []
        self.reports: list[dict[str, float]] = []

    def _fork(self, long_lived: bool) -> Worker:
        report_read, report_write = os.pipe()
        close = [report_read, self.release_write]
        if not long_lived:
            close.append(self.release_read)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            release = self.release_read if long_lived else None
            _worker(self.subject, self.series, report_write, release, close)
        os.close(report_write)
        return Worker(pid, report_read)

    def _report(self, worker: Worker) -> None:
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(worker.report, 4096)
            if not chunk:
                break
            data += chunk
        os.close(worker.report)
        report = json.loads(data or b'{"error": "no report"}')
        if "error" in report:
            raise RuntimeError(f"worker {worker.pid} failed:\n{report['error']}")
        self.reports.append(report)

    def start(self, count: int) -> None:
        """``count`` long-lived workers; returns when each has recorded every series."""
        workers = [self._fork(long_lived=True) for _ in range(count)]
        for worker in workers:
            self._report(worker)
        self.alive += workers

    def churn(self, count: int, parallel: int) -> float:
        """``count`` short-lived processes, ``parallel`` at a time; no exit hook. Seconds."""
        started = time.perf_counter()
        running: dict[int, Worker] = {}
        made = 0
        while made < count or running:
            while made < count and len(running) < parallel:
                worker = self._fork(long_lived=False)
                running[worker.pid] = worker
                made += 1
            pid, status = os.wait()
            if pid not in running:
                raise RuntimeError(f"a long-lived worker ({pid}) exited early: status {status}")
            self._report(running.pop(pid))
            if status != 0:
                raise RuntimeError(f"process {pid} exited with status {status}")
            self.exited.append(pid)
        return time.perf_counter() - started

    def stop(self, hook: bool) -> None:
        """Lets the long-lived workers exit, reaps them, runs the exit hook if asked."""
        os.close(self.release_write)
        for worker in self.alive:
            _, status = os.waitpid(worker.pid, 0)
            if status != 0:
                raise RuntimeError(f"worker {worker.pid} exited with status {status}")
            self.exited.append(worker.pid)
            if hook and self.subject.exit_hook is not None:
                self.subject.process_exited(worker.pid)
        self.alive = []

    def close(self) -> None:
        if self.alive:
            self.stop(hook=False)
        os.close(self.release_read)
        self.subject.teardown_group()
        shutil.rmtree(self.directory, ignore_errors=True)


def _memory_kib() -> tuple[int, int] | None:
    """(resident, peak resident) KiB of this process, or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


def _reset_peak_memory() -> bool:
    """Resets this process's peak resident size to its current one (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


def measure_state(subject: MultiprocessSubject, scrapes: int, expected: ReadBack) -> dict[str, Any]:
    """Times ``scrapes`` scrapes (each part); how much a scrape raised this process's
    resident memory at its peak (the largest over the scrapes); the footprint; what the last
    scrape says, and what it should say (``expected``)."""
    times: dict[str, list[float]] = {}
    peaks = []
    scrape = None
    for _ in range(scrapes):
        scrape = None
        gc.collect()
        before = _memory_kib() if _reset_peak_memory() else None
        scrape = subject.scrape()
        after = _memory_kib()
        for part, seconds in scrape.seconds.items():
            times.setdefault(part, []).append(seconds)
        if before is not None and after is not None:
            peaks.append((after[1] - before[0]) * 1024)
    assert scrape is not None
    return {
        "scrape_s": {part: statistics.median(values) for part, values in times.items()},
        "scrape_times_s": times,
        "scrape_peak_memory_bytes": max(peaks) if peaks else None,
        "scrape_bytes": len(scrape.text),
        "footprint": asdict(subject.footprint()),
        "read_back": asdict(subject.read_back(scrape)),
        "expected": asdict(expected),
    }


def _worker_cpu(reports: list[dict[str, float]]) -> dict[str, float]:
    return {
        "first_s": statistics.median(report["first_s"] for report in reports),
        "again_s": statistics.median(report["again_s"] for report in reports),
        "processes": len(reports),
    }


@dataclass
class Progress:
    started: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` at the start of the run (the same clock in every process)."""

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {text}", file=sys.stderr, flush=True)


def _expected(plan: Plan, processes: int, alive: int) -> ReadBack:
    """What a scrape should read: every series, each process's two observations of each,
    the live workers only."""
    return ReadBack(plan.series, float(processes * 2 * plan.series), float(alive))


def phase_workers(
    subject: MultiprocessSubject, plan: Plan, progress: Callable[[str], None]
) -> dict[str, Any]:
    """``plan.workers`` workers alive, then exited (exit hook run)."""
    found: dict[str, Any] = {}
    group = Group(subject, plan.series)
    try:
        progress(f"{subject.name}: {plan.workers} workers")
        group.start(plan.workers)
        found["workers_alive"] = measure_state(
            subject, plan.scrapes, _expected(plan, plan.workers, plan.workers)
        )
        group.stop(hook=True)
        found["workers_exited"] = measure_state(
            subject, plan.scrapes, _expected(plan, plan.workers, 0)
        )
        found["worker_cpu"] = _worker_cpu(group.reports)
    finally:
        group.close()
    return found


def phase_restarts(
    subject: MultiprocessSubject, plan: Plan, progress: Callable[[str], None]
) -> dict[str, Any]:
    """``plan.workers`` workers alive and 1, then ``plan.restarts``, short-lived processes
    that exited: without the exit hook, then with it."""
    found: dict[str, Any] = {}
    group = Group(subject, plan.series)
    try:
        group.start(plan.workers)
        group.churn(1, 1)
        progress(f"{subject.name}: scrapes after 1 restart")
        found["restarts_one"] = measure_state(
            subject, plan.scrapes, _expected(plan, plan.workers + 1, plan.workers)
        )
        progress(f"{subject.name}: {plan.restarts - 1:,} more restarts, {plan.parallel} at a time")
        found["churn_s"] = group.churn(plan.restarts - 1, plan.parallel)
        progress(f"{subject.name}: scrapes after {plan.restarts:,} restarts, no exit hook")
        expected = _expected(plan, plan.workers + plan.restarts, plan.workers)
        found["restarts_no_hook"] = measure_state(subject, plan.scrapes_after_restarts, expected)
        if subject.exit_hook is not None:
            started = time.perf_counter()
            for pid in group.exited:
                subject.process_exited(pid)
            hook_s = (time.perf_counter() - started) / max(1, len(group.exited))
            progress(f"{subject.name}: scrapes after {plan.restarts:,} restarts, exit hook run")
            found["restarts_hook"] = measure_state(subject, plan.scrapes_after_restarts, expected)
            found["restarts_hook"]["hook_s_per_call"] = hook_s
        found["restart_cpu"] = _worker_cpu(group.reports[plan.workers :])
    finally:
        group.close()
    return found


PHASES = {"workers": phase_workers, "restarts": phase_restarts}


def phase_child(subject_name: str, phase: str, plan_json: str, started: float) -> int:
    """``--phase-child``: one phase in this fresh process, the group's root; prints JSON."""
    subject = make_subject(subject_name)
    found = PHASES[phase](subject, Plan(**json.loads(plan_json)), Progress(started))
    print(json.dumps(found), flush=True)
    return 0


def measure_processes(
    subject: MultiprocessSubject, plan: Plan, progress: Progress
) -> dict[str, Any]:
    """Every phase, each in a fresh root process started with the subject's switch."""
    found: dict[str, Any] = {}
    for phase in PHASES:
        command = _script_command(
            "--phase-child", subject.name, phase, json.dumps(asdict(plan)), repr(progress.started)
        )
        done = subprocess.run(
            command,
            stdout=subprocess.PIPE,
            env=_environment_for(subject.environment()),
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{subject.name}: the {phase} phase failed (status {done.returncode});"
                " its traceback is above"
            )
        found.update(json.loads(done.stdout))
    return found


# -- output ----------------------------------------------------------------------------


def _ns(value: float) -> str:
    return f"{value:,.0f} ns" if abs(value) >= 100 else f"{value:,.1f} ns"


def _ms(seconds: float) -> str:
    value = seconds * 1e3
    return f"{value:,.0f} ms" if value >= 100 else f"{value:,.1f} ms"


def _mib(count: float) -> str:
    return f"{count / 2**20:,.1f} MiB"


def _factor(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _signed_ns(value: float) -> str:
    return ("+" if value >= 0 else "-") + _ns(abs(value))


def _scrape(state: dict[str, Any], part: str) -> str:
    if part not in state["scrape_s"]:
        return "n/a"
    times = state["scrape_times_s"][part]
    text = _ms(state["scrape_s"][part])
    if len(times) > 1:
        text += f" ({_ms(min(times))} to {_ms(max(times))})"
    return text


def _files(state: dict[str, Any]) -> str:
    footprint = state["footprint"]
    files = "1 file" if footprint["files"] == 1 else f"{footprint['files']:,} files"
    return f"{files}, {_mib(footprint['allocated'])} ({_mib(footprint['bytes'])} apparent)"


def _peak(state: dict[str, Any]) -> str:
    peak = state["scrape_peak_memory_bytes"]
    return "n/a" if peak is None else f"+{_mib(peak)}"


def _read_back(state: dict[str, Any]) -> str:
    found, expected = state["read_back"], state["expected"]

    def show(key: str) -> str:
        text = f"{found[key]:,.0f}"
        if found[key] != expected[key]:
            text += f" (**expected {expected[key]:,.0f}**)"
        return text

    text = f"{show('series')} series, {show('observations')} observations"
    if state["scrape_bytes"]:
        text += f" in {state['scrape_bytes'] / 1024:,.0f} KiB"
    if found["live_workers"] is not None:
        text += f"; live workers {show('live_workers')}"
    if found.get("note"):
        text += f" (but {found['note']})"
    return text


def read_back_right(state: dict[str, Any]) -> bool:
    """Whether a scrape read every series and observation, and the live workers only."""
    found, expected = state["read_back"], state["expected"]
    return all(
        found[key] == expected[key]
        for key in ("series", "observations", "live_workers")
        if found[key] is not None
    )


def _ratio_of_states(key: str, part: str | None) -> Callable[[dict[str, Any]], str]:
    """After the restarts (state ``key``) over after 1: a scrape part's, or the bytes held."""

    def show(results: dict[str, Any]) -> str:
        processes = results["processes"]
        if key not in processes:
            return "n/a"
        after, one = processes[key], processes["restarts_one"]
        if part is None:
            below = one["footprint"]["allocated"]
            value = after["footprint"]["allocated"] / below if below else None
        else:
            if part not in one["scrape_s"]:
                return "n/a"
            value = after["scrape_s"][part] / one["scrape_s"][part]
        return _factor(value)

    return show


def _ratio(figures: dict[str, Any]) -> str:
    text = _factor(figures["ratio"])
    ratios = [pair["ratio"] for pair in figures["pairs"] if pair["ratio"] is not None]
    if len(ratios) > 1:
        text += f" ({min(ratios):.2f}x to {max(ratios):.2f}x over {len(ratios)} pairs)"
    return text


Row = tuple[str, Callable[[dict[str, Any]], str]]


def table_rows(plan: Plan, names: Sequence[str]) -> list[Row]:
    """(what, how to print it from one subject's results) for every row of the table."""

    def per_call(operation: str, show: Callable[[dict[str, Any]], str]) -> Callable[..., str]:
        return lambda r: show(r["per_call"][operation]) if operation in r["per_call"] else "n/a"

    rows: list[Row] = []
    for operation, about in OPERATIONS.items():
        if not any(operation in SUBJECTS[name].idioms for name in names):
            continue
        rows += [
            (
                f"per call: {about.text}, single-process",
                per_call(operation, lambda f: _ns(f["single_ns"])),
            ),
            (
                f"per call: {about.text}, multiprocess",
                per_call(operation, lambda f: _ns(f["multi_ns"])),
            ),
            (
                f"per call: {about.text}, multiprocess - single-process",
                per_call(operation, lambda f: _signed_ns(f["difference_ns"])),
            ),
            (
                f"per call: {about.text}, multiprocess / single-process",
                per_call(operation, _ratio),
            ),
        ]
    workers, series, restarts = plan.workers, f"{plan.series:,}", f"{plan.restarts:,}"
    rows += [
        (
            f"a worker's first record into each of its {series} series (CPU, median)",
            lambda r: _ms(r["processes"]["worker_cpu"]["first_s"]),
        ),
        (
            "a worker's second record into each (CPU, median)",
            lambda r: _ms(r["processes"]["worker_cpu"]["again_s"]),
        ),
    ]
    states = [
        ("workers_alive", f"{workers} workers alive"),
        ("workers_exited", f"{workers} workers exited, exit hook run"),
        ("restarts_one", f"{workers} alive + 1 restarted"),
        ("restarts_no_hook", f"{workers} alive + {restarts} restarted, no exit hook"),
        ("restarts_hook", f"{workers} alive + {restarts} restarted, exit hook run"),
    ]
    parts: dict[str, str] = {}
    for name in names:
        for part, words in SUBJECTS[name].scrape_parts.items():
            parts.setdefault(part, words)
    part_words = {"text": "Prometheus text", "snapshot": "`meterage.snapshot()`"}

    def state_row(key: str, show: Callable[[dict[str, Any]], str]) -> Callable[..., str]:
        return lambda r: show(r["processes"][key]) if key in r["processes"] else "n/a"

    for key, text in states:
        for part in parts:
            rows.append(
                (
                    f"scrape, {part_words.get(part, part)} (median, range), {text}",
                    state_row(key, lambda s, p=part: _scrape(s, p)),
                )
            )
        rows += [
            (f"shared state held, {text}", state_row(key, _files)),
            (f"scrape's peak memory, {text}", state_row(key, _peak)),
            (f"scrape read back, {text}", state_row(key, _read_back)),
        ]
        if key == "restarts_no_hook":
            rows.append(
                (
                    f"{plan.restarts - 1:,} more short-lived processes, {plan.parallel} at a"
                    " time (wall)",
                    lambda r: f"{r['processes']['churn_s']:,.1f} s",
                )
            )
    rows.append(
        (
            "exit hook, per exited process",
            state_row("restarts_hook", lambda s: f"{s['hook_s_per_call'] * 1e6:,.0f} µs"),
        )
    )
    for key, text in (("restarts_no_hook", "no exit hook"), ("restarts_hook", "exit hook run")):
        for part in parts:
            rows.append(
                (
                    f"after {restarts} restarts / after 1, {text}: scrape, "
                    f"{part_words.get(part, part)}",
                    _ratio_of_states(key, part),
                )
            )
        rows.append(
            (
                f"after {restarts} restarts / after 1, {text}: shared state held",
                _ratio_of_states(key, None),
            )
        )
    return rows


def format_table(results: dict[str, Any]) -> list[str]:
    plan = Plan(**results["plan"])
    names = list(results["subjects"])
    lines = [
        "| what | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for what, show in table_rows(plan, names):
        cells = [show(results["subjects"][name]) for name in names]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return lines


GOAL_LIMIT = 1.1
"""Issue 11's bound on each goal below."""


def format_goals(results: dict[str, Any]) -> list[str]:
    """meterage's figures next to issue 11's goals (nothing without a meterage column)."""
    found = results["subjects"].get(MeterageSubject.name)
    if found is None:
        return []
    restarts = f"{results['plan']['restarts']:,}"
    goals = [
        ("timer-only per call, multiprocess / single-process", found["per_call"]["timer"]["ratio"]),
        ("all probes per call, multiprocess / single-process", found["per_call"]["full"]["ratio"]),
    ]
    processes = found["processes"]
    after, one = processes["restarts_no_hook"], processes["restarts_one"]
    for part, words in (("snapshot", "`snapshot()`"), ("text", "Prometheus text")):
        if part in one["scrape_s"]:
            goals.append(
                (
                    f"scrape ({words}) after {restarts} restarts / after 1",
                    after["scrape_s"][part] / one["scrape_s"][part],
                )
            )
    below = one["footprint"]["allocated"]
    goals.append(
        (
            f"shared state held after {restarts} restarts / after 1",
            after["footprint"]["allocated"] / below if below else None,
        )
    )
    lines = ["| goal (issue 11) | measured | limit | met |", "|---|---:|---:|---|"]
    for what, value in goals:
        met = "n/a" if value is None else ("yes" if value <= GOAL_LIMIT else "**no**")
        lines.append(f"| {what} | {_factor(value)} | ≤ {GOAL_LIMIT}x | {met} |")
    states = ("workers_alive", "workers_exited", "restarts_one", "restarts_no_hook")
    wrong = [key for key in states if not read_back_right(processes[key])]
    lines.append(
        "| every scrape reads every observation, and the live workers only | "
        f"{len(states) - len(wrong)} of {len(states)} states | all | "
        f"{'yes' if not wrong else '**no**'} |"
    )
    return lines


def describe(results: dict[str, Any]) -> list[str]:
    lines = []
    for name, found in results["subjects"].items():
        idioms = ", ".join(
            f"{OPERATIONS[operation].text}: `{code}`" for operation, code in found["idioms"].items()
        )
        lines.append(
            f"{name} {found['version']}: {found['switch']}; exit hook "
            f"{found['exit_hook'] or 'none needed'}; {idioms}."
        )
    return lines


def report(results: dict[str, Any]) -> list[str]:
    """The run's context, the table and meterage's goals, as printed."""
    plan = Plan(**results["plan"])
    lines = [results["machine"]]
    if plan.quick:
        lines.append(
            "REDUCED (--quick): smaller numbers than the documented run; not for the docs."
        )
    lines.append(
        f"{plan.series:,} series (one histogram, `route` label), {plan.workers} workers and "
        f"{plan.restarts:,} restarts made by os.fork(); per call: medians of {plan.rounds} "
        f"interleaved rounds minus the baseline's (where a mode needs its own process: "
        f"{plan.pairs} pair{'s' if plan.pairs > 1 else ''} of processes in lockstep); "
        f"scrapes: median of {plan.scrapes} ({plan.scrapes_after_restarts} after the "
        f"restarts); {results['seconds']:,.0f} s in all."
    )
    lines += [*describe(results), *results["not_measured"], "", *format_table(results)]
    goals = format_goals(results)
    if goals:
        lines += ["", *goals]
    return lines


def run(plan: Plan, names: Sequence[str], progress: Progress) -> tuple[dict[str, Any], list[Any]]:
    """Measures every subject of ``names`` that can run here; (results, subjects)."""
    subjects, missing = build_subjects(names)
    results: dict[str, Any] = {
        "machine": overhead.machine_line(),
        "plan": asdict(plan),
        "start": "os.fork()",
        "not_measured": missing,
        "subjects": {},
    }
    for subject in subjects:
        results["subjects"][subject.name] = {
            "version": subject.version,
            "switch": subject.switch,
            "exit_hook": subject.exit_hook,
            "idioms": subject.idioms,
            "per_call": subject.measure_per_call(plan, progress),
            "processes": measure_processes(subject, plan, progress),
        }
    results["seconds"] = time.monotonic() - progress.started
    progress("done")
    return results, subjects


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller numbers, for a smoke run")
    parser.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    parser.add_argument("--save", metavar="PATH", help="also write the raw numbers there")
    parser.add_argument(
        "--table", metavar="PATH", help="print the table of numbers saved by --save or --json"
    )
    parser.add_argument("--restarts", type=int, help="short-lived processes (default 1,000)")
    parser.add_argument(
        "--subject",
        action="append",
        choices=list(SUBJECTS),
        help="measure only this subject (repeatable; default: every one that can run)",
    )
    parser.add_argument("--per-call-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--phase-child", nargs=4, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.per_call_child:
        return per_call_child(*options.per_call_child)
    if options.phase_child:
        name, phase, plan_json, started = options.phase_child
        return phase_child(name, phase, plan_json, float(started))
    if options.table:
        for line in report(json.loads(Path(options.table).read_text())):
            print(line)
        return 0

    plan = QUICK if options.quick else FULL
    if options.restarts is not None:
        if options.restarts < 1:
            parser.error("--restarts must be >= 1")
        plan = Plan(**{**asdict(plan), "restarts": options.restarts})
    inherited = [name for name in GROUP_VARIABLES if name in os.environ]
    if inherited:
        # This process would be the group's root, or a member, of every process it starts.
        if argv is not None:
            parser.error(f"unset {' and '.join(inherited)} first")
        print(f"{' and '.join(inherited)} set: running again without", file=sys.stderr)
        environment = {k: v for k, v in os.environ.items() if k not in GROUP_VARIABLES}
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], environment)
    results, subjects = run(plan, options.subject or list(SUBJECTS), Progress())
    if not subjects:
        for line in results["not_measured"]:
            print(line, file=sys.stderr)
        return 1

    if options.save:
        Path(options.save).write_text(json.dumps(results, indent=2) + "\n")
    if options.json:
        for line in results["not_measured"]:
            print(line, file=sys.stderr)
        print(json.dumps(results, indent=2))
        return 0
    for line in report(results):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
