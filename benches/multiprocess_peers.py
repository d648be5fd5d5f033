"""Multiprocess metrics next to a peer's: prometheus_client's multiprocess mode, measured.

    python benches/multiprocess_peers.py            # ~5 min: the table for docs/benchmarks.md
    python benches/multiprocess_peers.py --quick    # ~15 s, smaller numbers (says so)
    python benches/multiprocess_peers.py --json     # the raw numbers instead of the table

What is measured, for each subject (a library in its multiprocess mode; see
``MultiprocessSubject``), in one run:

1. **Per call**, single-process next to multiprocess: a histogram observation and a counter
   increment on a series bound once (prometheus_client: ``.labels(...)`` cached), and an
   observation that resolves its labels per call (``h.labels(route=r).observe(v)``). The
   method is ``meterage.cli.overhead``'s: each statement unrolled in a loop, interleaved
   rounds in an order shuffled per round, the garbage collector off during the rounds; a
   figure is the median over rounds of the statement's time minus an empty statement's in
   the same round, and "multiprocess - single-process" is the median of the per-round
   differences of the two.
2. **Scrape**: ``WORKERS`` worker processes, made by ``os.fork()`` as gunicorn makes its
   workers, each record once into each of the same ``SERIES`` series (one series: one
   label set of one metric; here one histogram, ``route`` label with ``SERIES`` values)
   and stay alive; the parent times its scrape (median of several; the garbage collector
   on, as in a server, after a ``gc.collect()``), counts the files and bytes in the shared
   directory and reads the scrape back (series, observations). Then the workers exit, the
   exit hook runs for each, and the same again.
3. **After restarts**: in a fresh directory, ``WORKERS`` long-lived workers as above, then
   ``RESTARTS`` short-lived processes (``PARALLEL`` at a time), each recording into the same
   series and exiting, as gunicorn's ``max_requests`` restarts do. The scrape is timed with
   no exit hook having run (as for users who do not set one); then the hook
   (prometheus_client: ``multiprocess.mark_process_dead(pid)``, what its docs put in
   gunicorn's ``child_exit``) runs for every process that exited, and the scrape is timed
   again. Running the hook late leaves the directory as running it at each exit would: it
   only deletes files named after the dead pid.

Each worker also sets, once at its start, an unlabelled gauge of live workers (for
prometheus_client: ``multiprocess_mode="livesum"``, the kind of metric ``mark_process_dead``
acts on); the scrape's reading of it shows whether dead processes are still counted.

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
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol


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


overhead = _load_overhead()

VALUE = 0.03
"""What every histogram observation records (prometheus_client's default buckets: le=0.05)."""

SINGLE, MULTI = "single", "multi"
MODES = (SINGLE, MULTI)

OPERATIONS = {
    "observe": "histogram observation, series bound once",
    "inc": "counter increment, series bound once",
    "labels.observe": "histogram observation, labels resolved per call",
}
"""The per-call statements every subject provides, in both modes."""


@dataclass(frozen=True)
class Plan:
    series: int
    workers: int
    restarts: int
    parallel: int
    rounds: int
    scrapes: int
    """Scrapes timed per state with ``workers`` processes' files."""
    scrapes_after_restarts: int
    """Scrapes timed per state after the restarts (each can take tens of seconds)."""
    quick: bool = False


FULL = Plan(
    series=1_000,
    workers=16,
    restarts=1_000,
    parallel=4,
    rounds=300,
    scrapes=7,
    scrapes_after_restarts=3,
)
QUICK = Plan(
    series=250,
    workers=16,
    restarts=100,
    parallel=4,
    rounds=40,
    scrapes=3,
    scrapes_after_restarts=3,
    quick=True,
)


@dataclass
class Footprint:
    files: int
    bytes: int
    """Sum of the files' sizes (prometheus_client's are sparse: grown by truncate)."""
    allocated: int
    """Sum of the blocks the files hold on disk."""


def directory_footprint(path: str) -> Footprint:
    """Files, bytes and allocated bytes under ``path``."""
    files = size = allocated = 0
    for root, _, names in os.walk(path):
        for name in names:
            status = os.lstat(os.path.join(root, name))
            files += 1
            size += status.st_size
            allocated += status.st_blocks * 512
    return Footprint(files, size, allocated)


@dataclass
class Statement:
    """One per-call statement and the names it uses (they become fast locals)."""

    code: str
    namespace: dict[str, Any]


@dataclass
class ReadBack:
    """What a scrape says: whether it holds what the workers recorded."""

    series: int
    observations: float
    live_workers: float | None = None
    """The live-workers gauge as scraped; None where the subject has none."""


class MultiprocessSubject(Protocol):
    """A library in its multiprocess mode, as this benchmark drives it.

    Call order: ``setup_group(directory)`` in the parent for each fresh directory (the
    per-call statements, then each group of processes); ``per_call()`` (in the first
    group only); for every worker, after ``os.fork()``: ``worker_start()``, ``record(i)``
    for each series index, ``worker_stop()`` just before ``os._exit(0)``; in the parent:
    ``process_exited(pid)`` (the exit hook, if ``exit_hook`` is not None), ``scrape()``,
    ``read_back(scraped)``, ``footprint()``; ``teardown_group()`` at the end of a group.
    """

    name: str
    """The table's column header."""
    exit_hook: str | None
    """What ``process_exited`` does, in words; None: the subject needs no exit hook."""

    def setup_group(self, directory: str) -> None:
        """Points the library at a fresh, empty ``directory`` (shared by the group)."""

    def per_call(self) -> dict[tuple[str, str], Statement]:
        """``(operation, mode)`` -> statement, for every operation in ``OPERATIONS`` and
        both modes; multiprocess statements record into the group's directory."""

    def worker_start(self) -> None:
        """In a freshly forked worker: what an application does at import (make its
        metrics), and set the live-workers gauge, if the subject has one, to 1."""

    def record(self, series_index: int) -> None:
        """One observation of ``VALUE`` into series ``series_index`` (0 .. SERIES-1),
        resolving its labels as a request handler does."""

    def worker_stop(self) -> None:
        """Just before the worker's ``os._exit(0)`` (a flush, if the subject needs one)."""

    def process_exited(self, pid: int) -> None:
        """In the parent, for a worker that exited: gunicorn's ``child_exit`` hook."""

    def scrape(self) -> bytes:
        """In the parent: what an endpoint would serve for the whole group."""

    def read_back(self, scraped: bytes) -> ReadBack:
        """Parses a scrape of the workers' histogram (see ``ReadBack``)."""

    def footprint(self) -> Footprint:
        """The shared state's files and bytes (``directory_footprint`` where it is files)."""

    def teardown_group(self) -> None:
        """Closes what ``setup_group`` and ``per_call`` opened."""


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


class PrometheusSubject:
    """prometheus_client in multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR``, one mmap file
    per process and metric type, ``MultiProcessCollector`` reading them all per scrape."""

    name = "prometheus_client"
    exit_hook = "`multiprocess.mark_process_dead(pid)`"

    def __init__(self) -> None:
        from importlib.metadata import version

        self.version = version("prometheus-client")
        self.directory: str | None = None
        self._environment: contextlib.ExitStack | None = None
        self._value_classes: list[Any] = []
        self._histogram: Any = None
        self._routes = [route(index) for index in range(FULL.series)]

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

    def per_call(self) -> dict[tuple[str, str], Statement]:
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
        return statements

    def worker_start(self) -> None:
        from prometheus_client import Gauge, values

        values.ValueClass = values.MultiProcessValue()  # as if imported after the fork
        self._histogram, _ = self._metrics()
        workers = Gauge("app_workers", "Live workers", registry=None, multiprocess_mode="livesum")
        workers.set(1)

    def record(self, series_index: int) -> None:
        self._histogram.labels(route=self._routes[series_index]).observe(VALUE)

    def worker_stop(self) -> None:
        pass  # every write is already in the process's mmap file

    def process_exited(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.directory)

    def scrape(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self._registry)

    def read_back(self, scraped: bytes) -> ReadBack:
        from prometheus_client.parser import text_string_to_metric_families

        series = 0
        observations = live = 0.0  # no gauge in the scrape: no live worker counted
        for family in text_string_to_metric_families(scraped.decode()):
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


def meterage_subject() -> MultiprocessSubject | None:
    """THE SEAM: meterage's multiprocess mode plugs in here, as a second column.

    Return an object implementing ``MultiprocessSubject`` (``PrometheusSubject`` is the
    worked example): ``setup_group`` points meterage's multiprocess mode at the directory,
    ``per_call`` gives ``h.record(v)`` / ``c.add()`` on bound series and the per-call
    attributes form, in a plain and a multiprocess meterage; ``record(i)`` records ``VALUE``
    into ``meterage.histogram(...)`` with ``{"route": route(i)}``; ``scrape`` returns what
    meterage's aggregating process would serve; ``exit_hook`` is None if meterage needs no
    ``child_exit`` hook. Everything else (processes, timing, the table) is shared.

    meterage has no multiprocess mode yet, so there is nothing to measure: this returns
    None and the table has no meterage column.
    """
    return None


def build_subjects() -> tuple[list[MultiprocessSubject], list[str]]:
    """The subjects that can run here, and a line for each that cannot."""
    subjects: list[MultiprocessSubject] = []
    missing: list[str] = []
    meterage = meterage_subject()
    if meterage is None:
        missing.append("meterage: no multiprocess mode yet (see meterage_subject()); no column")
    else:
        subjects.append(meterage)
    if importlib.util.find_spec("prometheus_client") is None:
        missing.append("prometheus_client: not installed (pip install prometheus-client)")
    else:
        subjects.append(PrometheusSubject())
    return subjects, missing


# -- per call ---------------------------------------------------------------------------

NOTHING = "nothing"


def _key(subject: MultiprocessSubject, operation: str, mode: str) -> str:
    return f"{subject.name}:{operation}:{mode}"


def per_call_subjects(
    subject: MultiprocessSubject, statements: dict[tuple[str, str], Statement]
) -> list[Any]:
    """``overhead.Subject`` objects for a subject's statements, compared with "pass"."""
    return [
        overhead.Subject(
            _key(subject, operation, mode),
            f"{subject.name} {OPERATIONS[operation]}, {mode}",
            "multiprocess",
            statement.code,
            statement.namespace,
            baseline=NOTHING,
        )
        for (operation, mode), statement in statements.items()
    ]


def measure_per_call(
    subjects: Sequence[MultiprocessSubject], statements: dict[str, Any], rounds: int
) -> dict[str, dict[str, Any]]:
    """Every subject's statements in one interleaved run; per subject and operation the
    overhead in each mode and the paired multiprocess - single-process difference."""
    timed = [overhead.Subject(NOTHING, "an empty statement", "multiprocess", "pass", {})]
    for subject in subjects:
        timed += per_call_subjects(subject, statements[subject.name])
    results = overhead.measure(timed, rounds=rounds, batch_ms=2.0)
    measured: dict[str, dict[str, Any]] = {}
    for subject in subjects:
        for operation in OPERATIONS:
            single, multi = (_key(subject, operation, mode) for mode in MODES)
            difference = statistics.median(
                m - s for m, s in zip(results.samples[multi], results.samples[single], strict=True)
            )
            measured.setdefault(subject.name, {})[operation] = {
                "single_ns": results.overhead(single),
                "multi_ns": results.overhead(multi),
                "difference_ns": difference,
                "samples_ns": {
                    mode: results.samples[_key(subject, operation, mode)] for mode in MODES
                },
            }
    measured["baseline"] = {"samples_ns": results.samples[NOTHING]}
    return measured


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
            os.read(release, 1)  # blocks until the parent closes the other end: EOF
        subject.worker_stop()
        status = 0
    except BaseException:
        with contextlib.suppress(BaseException):
            os.write(report, json.dumps({"error": traceback.format_exc()}).encode() + b"\n")
    finally:
        os._exit(status)


class Group:
    """Processes sharing one fresh directory: long-lived workers, short-lived restarts."""

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


def measure_state(subject: MultiprocessSubject, scrapes: int) -> dict[str, Any]:
    """Times ``scrapes`` scrapes; how much the scrape raised this process's resident memory
    at its peak (the largest over the scrapes); the footprint; what the last scrape says."""
    times = []
    peaks = []
    scraped = b""
    for _ in range(scrapes):
        scraped = b""
        gc.collect()
        before = _memory_kib() if _reset_peak_memory() else None
        started = time.perf_counter()
        scraped = subject.scrape()
        times.append(time.perf_counter() - started)
        after = _memory_kib()
        if before is not None and after is not None:
            peaks.append((after[1] - before[0]) * 1024)
    return {
        "scrape_s": statistics.median(times),
        "scrape_times_s": times,
        "scrape_peak_memory_bytes": max(peaks) if peaks else None,
        "scrape_bytes": len(scraped),
        "footprint": asdict(subject.footprint()),
        "read_back": asdict(subject.read_back(scraped)),
    }


def _worker_cpu(reports: list[dict[str, float]]) -> dict[str, float]:
    return {
        "first_s": statistics.median(report["first_s"] for report in reports),
        "again_s": statistics.median(report["again_s"] for report in reports),
        "processes": len(reports),
    }


@dataclass
class Progress:
    started: float = field(default_factory=time.perf_counter)

    def __call__(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f} s] {text}", file=sys.stderr, flush=True)


def measure_processes(
    subject: MultiprocessSubject, plan: Plan, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Scrapes with ``plan.workers`` processes' data, then after ``plan.restarts`` more."""
    found: dict[str, Any] = {}
    group = Group(subject, plan.series)
    try:
        progress(f"{subject.name}: {plan.workers} workers")
        group.start(plan.workers)
        found["workers_alive"] = measure_state(subject, plan.scrapes)
        group.stop(hook=True)
        found["workers_exited"] = measure_state(subject, plan.scrapes)
        found["worker_cpu"] = _worker_cpu(group.reports)
    finally:
        group.close()

    group = Group(subject, plan.series)
    try:
        group.start(plan.workers)
        progress(f"{subject.name}: {plan.restarts:,} restarts, {plan.parallel} at a time")
        found["churn_s"] = group.churn(plan.restarts, plan.parallel)
        progress(f"{subject.name}: scrapes after the restarts, no exit hook")
        found["restarts_no_hook"] = measure_state(subject, plan.scrapes_after_restarts)
        if subject.exit_hook is not None:
            started = time.perf_counter()
            for pid in group.exited:
                subject.process_exited(pid)
            hook_s = (time.perf_counter() - started) / max(1, len(group.exited))
            progress(f"{subject.name}: scrapes after the restarts, exit hook run")
            found["restarts_hook"] = measure_state(subject, plan.scrapes_after_restarts)
            found["restarts_hook"]["hook_s_per_call"] = hook_s
        found["restart_cpu"] = _worker_cpu(group.reports[plan.workers :])
    finally:
        group.close()
    return found


# -- output ----------------------------------------------------------------------------


def _ns(value: float) -> str:
    return f"{value:,.0f} ns" if abs(value) >= 100 else f"{value:,.1f} ns"


def _ms(seconds: float) -> str:
    value = seconds * 1e3
    return f"{value:,.0f} ms" if value >= 100 else f"{value:,.1f} ms"


def _mib(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB"


def _scrape(state: dict[str, Any]) -> str:
    times = state["scrape_times_s"]
    text = _ms(state["scrape_s"])
    if len(times) > 1:
        text += f" ({_ms(min(times))} to {_ms(max(times))})"
    if state["scrape_peak_memory_bytes"] is not None:
        text += f", peak +{_mib(state['scrape_peak_memory_bytes'])}"
    return text


def _files(state: dict[str, Any]) -> str:
    footprint = state["footprint"]
    return (
        f"{footprint['files']:,} files, {_mib(footprint['bytes'])}"
        f" ({_mib(footprint['allocated'])} on disk)"
    )


def _read_back(state: dict[str, Any]) -> str:
    found = state["read_back"]
    text = (
        f"{found['series']:,} series, {found['observations']:,.0f} observations"
        f" in {state['scrape_bytes'] / 1024:,.0f} KiB"
    )
    if found["live_workers"] is not None:
        text += f"; live-workers gauge {found['live_workers']:,.0f}"
    return text


Row = tuple[str, Callable[[dict[str, Any]], str]]


def table_rows(plan: Plan) -> list[Row]:
    """(what, how to print it from one subject's results) for every row of the table."""
    rows: list[Row] = []
    for operation, text in OPERATIONS.items():
        for mode, label in ((SINGLE, "single-process"), (MULTI, "multiprocess")):
            rows.append(
                (
                    f"per call: {text}, {label}",
                    lambda r, o=operation, m=mode: _ns(r["per_call"][o][f"{m}_ns"]),
                )
            )
        rows.append(
            (
                f"per call: {text}, multiprocess minus single-process",
                lambda r, o=operation: "+" + _ns(r["per_call"][o]["difference_ns"]),
            )
        )
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
        ("restarts_no_hook", f"{workers} alive + {restarts} restarted, no exit hook"),
        ("restarts_hook", f"{workers} alive + {restarts} restarted, exit hook run"),
    ]

    def state_row(key: str, show: Callable[[dict[str, Any]], str]) -> Callable[..., str]:
        return lambda r: show(r["processes"][key]) if key in r["processes"] else "n/a"

    for key, text in states:
        rows += [
            (f"scrape (median, range, peak memory), {text}", state_row(key, _scrape)),
            (f"shared state, {text}", state_row(key, _files)),
            (f"scrape read back, {text}", state_row(key, _read_back)),
        ]
        if key == "restarts_no_hook":
            rows.append(
                (
                    f"{restarts} short-lived processes, {plan.parallel} at a time (wall)",
                    lambda r: f"{r['processes']['churn_s']:,.1f} s",
                )
            )
    rows.append(
        (
            "exit hook, per exited process",
            state_row("restarts_hook", lambda s: f"{s['hook_s_per_call'] * 1e6:,.0f} µs"),
        )
    )
    return rows


def format_table(results: dict[str, Any], subjects: Sequence[MultiprocessSubject]) -> list[str]:
    plan = Plan(**results["plan"])
    names = [subject.name for subject in subjects]
    lines = [
        "| what | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for what, show in table_rows(plan):
        cells = [show(results["subjects"][name]) for name in names]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return lines


def describe(subjects: Sequence[MultiprocessSubject]) -> list[str]:
    lines = []
    for subject in subjects:
        version = getattr(subject, "version", None)
        name = f"{subject.name} {version}" if version else subject.name
        lines.append(f"{name}: exit hook {subject.exit_hook or 'none needed'}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller numbers, for a smoke run")
    parser.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    parser.add_argument("--restarts", type=int, help="short-lived processes (default 1,000)")
    options = parser.parse_args(argv)
    plan = QUICK if options.quick else FULL
    if options.restarts is not None:
        if options.restarts < 0:
            parser.error("--restarts must be >= 0")
        plan = Plan(**{**asdict(plan), "restarts": options.restarts})

    subjects, missing = build_subjects()
    if not subjects or options.json:
        for line in missing:
            print(line, file=sys.stderr)
    if not subjects:
        return 1
    progress = Progress()

    directories: list[str] = []
    statements: dict[str, Any] = {}
    try:
        for subject in subjects:
            directories.append(tempfile.mkdtemp(prefix="meterage-mp-bench-"))
            subject.setup_group(directories[-1])
            statements[subject.name] = subject.per_call()
        progress(f"per call: {plan.rounds} interleaved rounds")
        per_call = measure_per_call(subjects, statements, plan.rounds)
        # The multiprocess statements must really have written to the shared directory.
        for subject in subjects:
            found = subject.read_back(subject.scrape())
            assert found.observations > 0, f"{subject.name}: nothing recorded in multiprocess mode"
    finally:
        for subject in subjects:
            subject.teardown_group()
        for directory in directories:
            shutil.rmtree(directory, ignore_errors=True)

    results: dict[str, Any] = {
        "machine": overhead.machine_line(),
        "plan": asdict(plan),
        "start": "os.fork()",
        "not_measured": missing,
        "subjects": {},
    }
    for subject in subjects:
        results["subjects"][subject.name] = {
            "version": getattr(subject, "version", None),
            "exit_hook": subject.exit_hook,
            "per_call": per_call[subject.name],
            "processes": measure_processes(subject, plan, progress),
        }
    results["baseline_samples_ns"] = per_call["baseline"]["samples_ns"]
    results["seconds"] = time.perf_counter() - progress.started
    progress("done")

    if options.json:
        print(json.dumps(results, indent=2))
        return 0
    print(overhead.machine_line())
    if plan.quick:
        print("REDUCED (--quick): smaller numbers than the documented run; not for the docs.")
    print(
        f"{plan.series:,} series (one histogram, `route` label), {plan.workers} workers and "
        f"{plan.restarts:,} restarts made by os.fork(); per call: median of {plan.rounds} "
        f"interleaved rounds, minus an empty statement; scrapes: median of {plan.scrapes} "
        f"({plan.scrapes_after_restarts} after the restarts)."
    )
    for line in [*describe(subjects), *missing]:
        print(line)
    print()
    for line in format_table(results, subjects):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
