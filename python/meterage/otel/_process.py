"""The standard OpenTelemetry ``process.*`` metrics, read natively at collection time.

Every instrument of one collection shares one ``_native.process_metrics()`` reading (tens
of microseconds: ``getrusage``, ``/proc/self/{stat,io,net/dev}`` and the size of
``/proc/self/fd``), so psutil is not needed. Names, units and attribute keys follow the
current OpenTelemetry semantic conventions for OS process metrics (release candidate):
the descriptor count is ``process.unix.file_descriptor.count`` (it replaced
``process.open_file_descriptor.count``). A value the machine does not provide (no
``/proc``, a restricted container) is left out rather than reported as zero.

Notes on the values:

* ``process.cpu.time`` comes from ``getrusage(RUSAGE_SELF)``: all threads, exited ones
  included, in microseconds (the kernel splits an exact total into user and system by
  scheduler ticks).
* ``process.cpu.utilization`` is the CPU time since the previous collection (the first:
  since the process started) over the wall time between them times the CPUs this process
  may run on (``os.sched_getaffinity``), clamped to [0, 1]. Several readers of one provider
  share it: each sees the utilization since the previous collection by any of them.
* ``process.context_switches`` sums every thread (``/proc/self/status`` would count the
  main thread only).
* ``process.network.io``: Linux keeps no per-process network counters. The value is the
  traffic of the process's network namespace on every interface but ``lo`` — the process's
  own only when it has the namespace to itself, as in a container; on a host it is the
  whole machine's.
* ``process.disk.io`` counts storage IO; writes to tmpfs count nothing.

Multiprocess mode (``meterage.multiprocess``, unless ``METERAGE_EXPORT_PER_PROCESS=1``):
the semantic conventions define ``process.*`` as the metrics of one process, and a sum over
processes is not one (the summed uptime, utilization or thread count of a group means
nothing a process metric means), so every metric is observed once per live member of the
group (``meterage.multiprocess.members()``), each with a ``process.pid`` attribute (int),
all read from ``/proc/<pid>`` by ``_native.process_metrics_of``; the process that exports
sends them. No process can call ``getrusage`` for another, so for every member (this one
too, so that a member's series does not change source when another process becomes the
exporter):

* ``process.cpu.time`` and ``process.paging.faults`` come from ``/proc/<pid>/stat``: the
  whole thread group, exited threads included, CPU truncated to clock ticks (10 ms);
* ``process.context_switches`` sums ``/proc/<pid>/task/*/status`` over the live threads:
  the switches of a thread that exited are gone from ``/proc``. So that the counter never
  goes down, each member's value is held at its highest while its live threads catch up;
* ``process.cpu.utilization`` is each member's, with its own previous reading and CPU
  affinity (a member seen for the first time: since it started);
* ``process.network.io`` is a network namespace's, not a process's: it is observed once,
  without ``process.pid`` (this process's namespace, which the group shares but where a
  member runs in its own).

With ``METERAGE_EXPORT_PER_PROCESS=1`` each process exports its own numbers, and its
process metrics are the single-process ones (its own, without ``process.pid``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from meterage import _native, multiprocess
from meterage.otel._shared import SharedReading, gated

Reading = dict[str, float | int | None]
#: One collection's readings: ``{None: this process's}``, or in multiprocess mode
#: ``{pid: that member's}``.
Readings = dict[int | None, Reading]

#: The attribute naming a member of the group (multiprocess mode).
PID_KEY = "process.pid"
#: A network namespace's metric: observed once in multiprocess mode.
_PER_NAMESPACE = "process.network.io"
_SWITCH_KEYS = ("context_switches.voluntary", "context_switches.involuntary")

# (name, kind, unit, description, attribute key, ((reading key, attribute value), ...)).
# Kinds: "counter" (ObservableCounter), "updown" (ObservableUpDownCounter), "gauge".
_METRICS: tuple[tuple[str, str, str, str, str | None, tuple[tuple[str, str | None], ...]], ...] = (
    (
        "process.cpu.time",
        "counter",
        "s",
        "Total CPU seconds broken down by different CPU modes.",
        "cpu.mode",
        (("cpu.time.user", "user"), ("cpu.time.system", "system")),
    ),
    (
        "process.memory.usage",
        "updown",
        "By",
        "The amount of physical memory in use.",
        None,
        (("memory.usage", None),),
    ),
    (
        "process.memory.virtual",
        "updown",
        "By",
        "The amount of committed virtual memory.",
        None,
        (("memory.virtual", None),),
    ),
    (
        "process.disk.io",
        "counter",
        "By",
        "Disk bytes transferred.",
        "disk.io.direction",
        (("disk.io.read", "read"), ("disk.io.write", "write")),
    ),
    (
        "process.network.io",
        "counter",
        "By",
        "Network bytes transferred (the process's network namespace, loopback excluded).",
        "network.io.direction",
        (("network.io.receive", "receive"), ("network.io.transmit", "transmit")),
    ),
    (
        "process.context_switches",
        "counter",
        "{context_switch}",
        "Number of times the process has been context switched.",
        "process.context_switch.type",
        (
            ("context_switches.voluntary", "voluntary"),
            ("context_switches.involuntary", "involuntary"),
        ),
    ),
    (
        "process.paging.faults",
        "counter",
        "{fault}",
        "Number of page faults the process has made.",
        "system.paging.fault.type",
        (("paging.faults.minor", "minor"), ("paging.faults.major", "major")),
    ),
    (
        "process.thread.count",
        "updown",
        "{thread}",
        "Process threads count.",
        None,
        (("thread.count", None),),
    ),
    (
        "process.unix.file_descriptor.count",
        "updown",
        "{file_descriptor}",
        "Number of UNIX file descriptors in use by the process.",
        None,
        (("open_file_descriptor.count", None),),
    ),
    (
        "process.uptime",
        "gauge",
        "s",
        "The time the process has been running.",
        None,
        (("uptime", None),),
    ),
)

UTILIZATION = "process.cpu.utilization"

#: Every metric ``register_process_metrics`` may export (``process.network.io`` only where
#: ``/proc/self/net/dev`` is readable; any other only where its source is).
PROCESS_METRIC_NAMES: tuple[str, ...] = (*(spec[0] for spec in _METRICS), UTILIZATION)


def _usable_cpus(pid: int = 0) -> int:
    """CPUs process ``pid`` (0: this one) may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(pid)))
    except (AttributeError, OSError):  # not Linux, or the process is gone
        return os.cpu_count() or 1


def _per_member() -> bool:
    """Whether the process metrics are every group member's (multiprocess mode, unless
    each process exports its own numbers)."""
    if not multiprocess.is_enabled():
        return False
    return not multiprocess.exports_per_process()


def _read() -> Readings:
    # _native's functions are looked up at each reading (tests replace them).
    if not _per_member():
        return {None: _native.process_metrics()}
    pids = multiprocess.members() or [os.getpid()]
    return {pid: reading for pid, reading in _native.process_metrics_of(pids).items()}


class _ProcessReadings(SharedReading[Readings]):
    """The shared process readings, and the CPU times of the previous utilization."""

    def __init__(self) -> None:
        super().__init__(_read, {}, name="the process metrics")
        # Per process (None: this one, outside multiprocess mode): (start time, monotonic
        # time, user s, system s) the last utilization was computed at.
        self._previous: dict[int | None, tuple[object, float, float, float]] = {}
        self._utilization: dict[int | None, dict[str, float]] | None = None
        # Per member: (start time, the highest context switches reported).
        self._switches: dict[int | None, tuple[object, dict[str, float | int]]] = {}

    def forked(self) -> None:
        self._previous = {}  # the child's CPU times started again from zero

    def refreshed(self) -> None:
        self._utilization = None
        self._hold_switches()

    def _hold_switches(self) -> None:
        """Keeps each member's context switches from going down when one of its threads
        exits (``/proc`` sums the live threads only)."""
        if not self.current:
            return  # a failed reading: keep what was seen
        held: dict[int | None, tuple[object, dict[str, float | int]]] = {}
        for pid, reading in self.current.items():
            if pid is None:
                continue  # getrusage: exited threads included, never goes down
            start = reading.get("start_time")
            seen_start, highest = self._switches.get(pid, (None, {}))
            if seen_start != start:
                highest = {}
            highest = dict(highest)
            for key in _SWITCH_KEYS:
                value = reading.get(key)
                if value is None:
                    continue
                if value < highest.get(key, value):
                    reading[key] = highest[key]
                else:
                    highest[key] = value
            held[pid] = (start, highest)
        self._switches = held

    def utilization(self, callback: int) -> dict[int | None, dict[str, float]]:
        with self.lock:
            self.refresh(callback)
            if self._utilization is None:
                self._utilization = self._compute_utilization()
            return self._utilization

    def _compute_utilization(self) -> dict[int | None, dict[str, float]]:
        previous, self._previous = self._previous, {}
        result: dict[int | None, dict[str, float]] = {}
        for pid, reading in self.current.items():
            user = reading.get("cpu.time.user")
            system = reading.get("cpu.time.system")
            if user is None or system is None:
                continue
            start = reading.get("start_time")
            self._previous[pid] = (start, self.read_at, user, system)
            before = previous.get(pid)
            if before is None or before[0] != start:  # the first: since the process started
                wall = reading.get("uptime")
                since_user = since_system = 0.0
            else:
                _, at, since_user, since_system = before
                wall = self.read_at - at
            if not wall or wall <= 0:
                continue
            capacity = wall * _usable_cpus(pid or 0)
            result[pid] = {
                mode: min(1.0, max(0.0, (used - since) / capacity))
                for mode, used, since in (
                    ("user", user, since_user),
                    ("system", system, since_system),
                )
            }
        return result


def _attributes(pid: int | None, attributes: dict[str, Any] | None) -> dict[str, Any] | None:
    """A member's attributes: ``process.pid`` first; outside multiprocess mode unchanged."""
    if pid is None:
        return attributes
    return {PID_KEY: pid, **(attributes or {})}


def _one_namespace(readings: Readings) -> Readings:
    """One reading for a network namespace's metric, observed without ``process.pid``:
    this process's (whose namespace the group shares), else any member's."""
    if None in readings:
        return readings
    reading = readings.get(os.getpid()) or next(iter(readings.values()), None)
    return {} if reading is None else {None: reading}


def _reading_callback(
    readings: _ProcessReadings,
    callback: int,
    attribute_key: str | None,
    sources: Sequence[tuple[str, str | None]],
    *,
    per_namespace: bool = False,
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    pairs = [
        (key, {attribute_key: value} if attribute_key is not None else None)
        for key, value in sources
    ]

    def observe(options: CallbackOptions) -> list[Observation]:
        current = readings.reading(callback)
        if per_namespace:
            current = _one_namespace(current)
        return [
            Observation(value, _attributes(pid, attributes))
            for pid, reading in current.items()
            for key, attributes in pairs
            if (value := reading.get(key)) is not None
        ]

    return observe


def _utilization_callback(
    readings: _ProcessReadings, callback: int
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> list[Observation]:
        return [
            Observation(value, _attributes(pid, {"cpu.mode": mode}))
            for pid, utilization in readings.utilization(callback).items()
            for mode, value in utilization.items()
        ]

    return observe


def register_process_metrics(meter: Meter, *, enabled: Callable[[], bool] | None = None) -> None:
    """Creates the ``process.*`` observable instruments on ``meter``.

    Their callbacks share one native reading per collection; values this machine does not
    provide are left out. See the module docstring for what each value means. While
    ``enabled()`` is false they observe nothing (and read nothing).
    """
    readings = _ProcessReadings()
    create = {
        "counter": meter.create_observable_counter,
        "updown": meter.create_observable_up_down_counter,
        "gauge": meter.create_observable_gauge,
    }
    for index, (name, kind, unit, description, attribute_key, sources) in enumerate(_METRICS):
        create[kind](
            name,
            callbacks=[
                gated(
                    _reading_callback(
                        readings,
                        index,
                        attribute_key,
                        sources,
                        per_namespace=name == _PER_NAMESPACE,
                    ),
                    enabled,
                )
            ],
            unit=unit,
            description=description,
        )
    meter.create_observable_gauge(
        UTILIZATION,
        callbacks=[gated(_utilization_callback(readings, len(_METRICS)), enabled)],
        unit="1",
        description=(
            "Difference in process.cpu.time since the last measurement, divided by the "
            "elapsed time and number of CPUs available to the process."
        ),
    )
