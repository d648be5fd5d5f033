"""Jobs: metered calls with job semantics, for hand-rolled workers and job queues.

A job is a call of operation ``messaging.process`` (an ``OpenCall``) whose series carries
OpenTelemetry's messaging attributes (``messaging.system``, ``messaging.destination.name``
for the queue, ``messaging.operation.name`` and ``messaging.operation.type`` =
``process``) and meterage's own: ``meterage.job.name`` (the task or function) and
``meterage.job.status`` (``succeeded``, ``failed`` or ``retried``), with ``error.type`` for
failures. Each job records its duration, its probes (CPU, IO, faults, context switches,
memory: the call's), the time it waited in its queue (histogram ``job.queue.wait``, s)
and, when it reports one, the size of its output (histogram ``job.output.size``, By), all
in the same attribute series; the jobs in flight are the call's in-flight count
(``meterage.calls.active``). ``queue_depth`` registers a queue's length, exported at each
collection as the gauge ``job.queue.depth``.

Three ways to run a job, each charging it only for its own work:

* ``@meterage.jobs.job("name", queue=...)`` on a function or an ``async def``: each call
  is a job, its coroutine's steps metered as the job's;
* ``with meterage.jobs.job("name", queue=..., enqueued_at=...) as job:`` for a block;
* ``meterage.jobs.start("name", queue=..., enqueued_at=...)`` for a worker that runs the
  work itself (``job.run(function, ...)``, ``await job.steps(coroutine)``) and ends it
  (``job.end(error)``).

>>> import meterage, meterage.jobs, time
>>> @meterage.jobs.job("thumbnail", queue="images", system="threads", probes=())
... def thumbnail(item):
...     meterage.jobs.report_output(len(item))
...     return item.upper()
>>> thumbnail("abc")
'ABC'
>>> with meterage.jobs.job("resize", queue="images", enqueued_at=time.time() - 2.5):
...     pass
>>> sorted((s.attributes["meterage.job.name"], s.attributes["meterage.job.status"], s.count)
...        for s in meterage.snapshot() if s.operation == "messaging.process")
[('resize', 'succeeded', 1), ('thumbnail', 'succeeded', 1)]
>>> meterage.jobs.output_size().snapshot(
...     {**meterage.jobs.attributes_of("thumbnail", queue="images", system="threads"),
...      "meterage.job.status": "succeeded"}).sum
3.0
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import functools
import inspect
import logging
import math
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

import meterage
from meterage import _handoff, _native
from meterage._validate import check_fraction, check_probe_names, check_sample

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Observation

__all__ = [
    "DESTINATION",
    "FAILED",
    "JOB_NAME",
    "MAX_CLOCK_SKEW",
    "OPERATION",
    "OPERATION_NAME",
    "OPERATION_TYPE",
    "OUTPUT_SIZE",
    "QUEUE_DEPTH",
    "QUEUE_WAIT",
    "RETRIED",
    "STATUS",
    "SUCCEEDED",
    "SYSTEM",
    "Job",
    "JobMeter",
    "QueueDepth",
    "attributes_of",
    "current",
    "job",
    "output_size",
    "queue_depth",
    "queue_wait",
    "read_queue_depths",
    "report_output",
    "start",
]

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])
AttributeValue = str | int | float | bool

#: The operation of every job's call (OpenTelemetry's name for processing a message).
OPERATION = "messaging.process"
#: The messaging system: ``celery``, ``rq``, or what a hand-rolled worker names itself.
SYSTEM = "messaging.system"
#: The queue the job came from.
DESTINATION = "messaging.destination.name"
#: ``process``, on every job.
OPERATION_NAME = "messaging.operation.name"
#: ``process``, on every job.
OPERATION_TYPE = "messaging.operation.type"
#: The task or function name.
JOB_NAME = "meterage.job.name"
#: How the job ended: ``SUCCEEDED``, ``FAILED`` or ``RETRIED``.
STATUS = "meterage.job.status"
SUCCEEDED = "succeeded"
FAILED = "failed"
RETRIED = "retried"
#: Histogram (s): when the job started, less when it was enqueued (or became due).
QUEUE_WAIT = "job.queue.wait"
#: Histogram (By): the output size a job reported (``report_output``).
OUTPUT_SIZE = "job.output.size"
#: Gauge ({job}): the jobs waiting in a queue, read at each collection (``queue_depth``).
QUEUE_DEPTH = "job.queue.depth"
#: How far in the future an enqueue time may be (clocks of two machines differ): up to
#: this many seconds it counts as a wait of 0; further is a ValueError.
MAX_CLOCK_SKEW = 1.0
#: Enqueue times before this (2001-09-09) are not ``time.time()`` readings: most likely a
#: ``time.monotonic()`` or ``perf_counter()`` one.
_EARLIEST = 1e9

_STATUS_ATTRIBUTES = {status: {STATUS: status} for status in (SUCCEEDED, FAILED, RETRIED)}
_OWN_KEYS = frozenset((SYSTEM, DESTINATION, OPERATION_NAME, OPERATION_TYPE, JOB_NAME, STATUS))

_logger = logging.getLogger("meterage.jobs")
_wait_histogram: meterage.Histogram | None = None
_output_histogram: meterage.Histogram | None = None


def queue_wait() -> meterage.Histogram:
    """The ``job.queue.wait`` histogram (s): one value per job whose enqueue time is known,
    in the job's series (its attributes, status and error.type)."""
    global _wait_histogram
    if _wait_histogram is None:
        _wait_histogram = meterage.histogram(
            QUEUE_WAIT,
            unit="s",
            description="Time jobs waited in their queue: start less enqueue (or due) time.",
            boundaries=meterage.BOUNDARIES["queue.wait"],
        )
    return _wait_histogram


def output_size() -> meterage.Histogram:
    """The ``job.output.size`` histogram (By): one value per job that reported its output
    size, in the job's series."""
    global _output_histogram
    if _output_histogram is None:
        _output_histogram = meterage.histogram(
            OUTPUT_SIZE,
            unit="By",
            description="Size of the output jobs reported.",
            boundaries=meterage.BOUNDARIES["bytes"],
        )
    return _output_histogram


# --- arguments ---------------------------------------------------------------------------


def _text(argument: str, value: object, *, optional: bool) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        allowed = "a non-empty str or None" if optional else "a non-empty str"
        raise TypeError(f"{argument} must be {allowed}, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{argument} must not be empty")
    return value


def _timestamp_of(value: object, argument: str = "enqueued_at") -> float:
    """``value`` (a ``time.time()`` reading in seconds, or a timezone-aware datetime) as
    seconds since the epoch; errors name ``argument``."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"{argument} is a naive datetime ({value.isoformat()}): give a timezone-aware "
                "one (datetime.now(timezone.utc)) or time.time() seconds"
            )
        return value.timestamp()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{argument} must be time.time() seconds (int or float) or a timezone-aware "
            f"datetime, not {type(value).__name__}"
        )
    seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{argument} must be finite, got {value!r}")
    if seconds < _EARLIEST:
        raise ValueError(
            f"{argument}={value!r} is not a time.time() reading (it is before 2001): a "
            "time.monotonic() or perf_counter() value? Give time.time() seconds"
        )
    return seconds


def _wait_since(enqueued: float, now: float, argument: str = "enqueued_at") -> float:
    """Seconds from ``enqueued`` to ``now`` (both time.time() seconds); a time up to
    ``MAX_CLOCK_SKEW`` in the future is a wait of 0, a later one a ValueError."""
    waited = now - enqueued
    if waited >= 0.0:
        return waited
    if waited >= -MAX_CLOCK_SKEW:
        return 0.0
    raise ValueError(
        f"{argument} is {-waited:.3f} s in the future (more than the {MAX_CLOCK_SKEW:g} s "
        "allowed for clocks that differ): a job cannot start before it was enqueued"
    )


def _check_settings(
    probes: Iterable[str] | None, sample: float | None, budget: float | None
) -> tuple[str, ...] | None:
    """Checks a job meter's probing settings as ``meterage.meter`` does (TypeError or
    ValueError naming the argument); returns the probe names as a tuple."""
    check_sample(sample)
    check_fraction("budget", budget)
    if sample is not None and budget is not None:
        raise ValueError(
            "give either sample (a fixed probing rate) or budget (an overhead share), not both"
        )
    return check_probe_names(probes)


def _static_attributes(
    name: str, queue: str | None, system: str | None, attributes: Mapping[str, Any] | None
) -> dict[str, AttributeValue]:
    static: dict[str, AttributeValue] = {}
    if system is not None:
        static[SYSTEM] = system
    if queue is not None:
        static[DESTINATION] = queue
    static[OPERATION_NAME] = "process"
    static[OPERATION_TYPE] = "process"
    static[JOB_NAME] = name
    if attributes:
        if not isinstance(attributes, Mapping):
            raise TypeError(
                f"attributes must be a mapping of str to str, int, float or bool, not "
                f"{type(attributes).__name__}"
            )
        taken = sorted(key for key in attributes if key in _OWN_KEYS)
        if taken:
            raise ValueError(
                f"attributes must not set {', '.join(map(repr, taken))}: meterage.jobs sets "
                "them (name=, queue=, system= and the job's status)"
            )
        static.update(attributes)
    return static


def attributes_of(
    name: str,
    *,
    queue: str | None = None,
    system: str | None = None,
    attributes: Mapping[str, AttributeValue] | None = None,
) -> dict[str, AttributeValue]:
    """The attributes every job of this name, queue and system has (its series add
    ``meterage.job.status`` and, for failures, ``error.type``): for looking series up.

    >>> import meterage.jobs
    >>> meterage.jobs.attributes_of("send", queue="email", system="celery")["meterage.job.name"]
    'send'
    """
    return _static_attributes(
        _text("name", name, optional=False) or "",
        _text("queue", queue, optional=True),
        _text("system", system, optional=True),
        attributes,
    )


# Meters by every setting that makes their static attributes or sampling: a job's meter
# is a dictionary lookup.
_MeterKey = tuple[Any, ...]
_meters: dict[_MeterKey, _native.MeterCore] = {}
_MADE_LIMIT = 4096


def _meter_for(
    name: str,
    queue: str | None,
    system: str | None,
    attributes: Mapping[str, Any] | None,
    probes: Iterable[str] | None,
    sample: float | None,
    budget: float | None,
) -> _native.MeterCore:
    if probes is not None and type(probes) is not tuple and not isinstance(probes, str):
        try:
            probes = tuple(probes)  # once: an iterator would be spent by the key
        except TypeError:
            pass  # not iterable: meterage.meter says so, naming probes
    try:
        key: _MeterKey = (
            name,
            queue,
            system,
            None if not attributes else tuple(sorted(attributes.items())),
            probes,
            sample,
            budget,
        )
        found = _meters.get(key)
    except (TypeError, AttributeError):  # the checks below say what is wrong
        key, found = (), None
    if found is not None:
        return found
    _text("name", name, optional=False)
    _text("queue", queue, optional=True)
    _text("system", system, optional=True)
    static = _static_attributes(name, queue, system, attributes)
    core: _native.MeterCore = meterage.meter(
        OPERATION, attributes=static, probes=probes, sample=sample, budget=budget
    )
    if key and len(_meters) < _MADE_LIMIT:
        _meters[key] = core
    return core


# --- jobs --------------------------------------------------------------------------------

# The jobs of `with` blocks in this context, innermost last, each with its JobMeter and
# the call that was current when it began (their calls are native blocks, not OpenCalls).
_BLOCKS: contextvars.ContextVar[tuple[tuple[JobMeter, Job, Any], ...]] = contextvars.ContextVar(
    "meterage.jobs.blocks", default=()
)
_CURRENT_CALL = _native.current_call_var()
# Open jobs by their call: meterage.current_call() finds its job wherever the call is
# current (the job's function, its tasks, the threads it hands work to).
_open_jobs: dict[int, Job] = {}


class Job:
    """One job, from its start to its end: what ``start`` returns, what a ``with
    meterage.jobs.job(...)`` block gets, and ``current()`` inside a job.

    * ``run(function, *args, **kwargs)`` runs ``function`` as a step of the job in this
      thread (its probes around it, the job current meanwhile) and returns its result;
      ``steps(awaitable)`` is an awaitable whose coroutine steps are the job's.
    * ``report_output(nbytes)`` adds to the job's output size; ``set_attribute(key,
      value)`` and ``set_attributes(mapping)`` add attributes to its series.
    * ``retry(error=None)`` marks it to end as retried (``error``, if given, names its
      ``error.type``); ``end(error=None)`` ends it: ``retried`` if marked so, else
      ``failed`` with ``error`` (an exception, its class or an ``error.type`` str) or
      ``succeeded``. A second end does nothing.

    ``name``, ``queue``, ``system``, ``queue_wait`` (seconds, or None), ``status`` (None
    until it ended), ``ended``, ``attributes`` and ``call`` (its ``OpenCall``; None for a
    ``with`` block's job) say where it stands.

    >>> import meterage.jobs
    >>> job = meterage.jobs.start("report", queue="batch", enqueued_at=time.time() - 1)
    >>> job.run(sum, [1, 2, 3])
    6
    >>> job.queue_wait >= 1.0
    True
    >>> job.end()
    >>> job.status
    'succeeded'
    """

    __slots__ = (
        "_block",
        "_call",
        "_output",
        "_retry",
        "_retry_error",
        "_status",
        "name",
        "queue",
        "queue_wait",
        "system",
    )

    def __init__(
        self,
        call: _native.OpenCall | None,
        block: _native.Call | None,
        name: str,
        queue: str | None,
        system: str | None,
        queue_wait: float | None,
    ) -> None:
        self._call = call
        self._block = block
        self.name = name
        self.queue = queue
        self.system = system
        self.queue_wait = queue_wait
        self._output: int | None = None
        self._retry = False
        self._retry_error: BaseException | type[BaseException] | str | None = None
        self._status: str | None = None

    @property
    def call(self) -> _native.OpenCall | None:
        return self._call

    @property
    def status(self) -> str | None:
        return self._status

    @property
    def ended(self) -> bool:
        return self._status is not None

    @property
    def attributes(self) -> dict[str, AttributeValue]:
        source = self._call if self._call is not None else self._block
        assert source is not None
        return source.attributes

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._call is not None:
            self._call.set_attribute(key, value)
        else:
            assert self._block is not None
            self._block.set_attribute(key, value)

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if self._call is not None:
            self._call.set_attributes(attributes)
        else:
            assert self._block is not None
            self._block.set_attributes(attributes)

    def report_output(self, nbytes: int) -> None:
        """Adds ``nbytes`` (an int >= 0) to the job's output size, recorded when it ends."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"nbytes must be an int (bytes), not {type(nbytes).__name__}")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if self._status is not None:
            raise RuntimeError(f'job "{self.name}" has ended: report its output before it ends')
        self._output = nbytes if self._output is None else self._output + nbytes

    def retry(self, error: BaseException | type[BaseException] | str | None = None) -> None:
        """Marks the job to end as ``retried`` (whatever ends it); ``error`` names its
        ``error.type`` (an exception, its class or a str)."""
        if self._status is not None:
            raise RuntimeError(f'job "{self.name}" has ended: mark it retried before it ends')
        _check_error(error)
        self._retry = True
        self._retry_error = error

    def run(self, function: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """``function(*args, **kwargs)`` as a step of this job, in this thread."""
        if self._call is None:
            return function(*args, **kwargs)  # a block's job: the block is metering it
        return self._call.run(function, *args, **kwargs)

    def steps(self, awaitable: Awaitable[_T]) -> Awaitable[_T]:
        """``awaitable``, its steps metered as the job's; the job is current meanwhile."""
        if self._call is None:
            raise TypeError(
                "a with block's job cannot meter coroutine steps (the block meters its "
                "thread); use @meterage.jobs.job on the async def, or meterage.jobs.start"
            )
        return _current_during(self._call, self._call.steps(awaitable))

    def end(self, error: BaseException | type[BaseException] | str | None = None) -> None:
        """Ends the job now (see the class); nothing if it has ended."""
        if self._status is not None:
            return
        call = self._call
        if call is None:
            raise RuntimeError(f'job "{self.name}" is a with block\'s: the block ends it')
        if self._retry:
            status = RETRIED
            error = self._retry_error if self._retry_error is not None else error
        else:
            status = SUCCEEDED if error is None else FAILED
        values: list[tuple[meterage.Histogram, float]] = []
        if self.queue_wait is not None:
            values.append((queue_wait(), self.queue_wait))
        if self._output is not None:
            values.append((output_size(), self._output))
        # A bad error raises here (TypeError), and the job stays open.
        call.finish(error, _STATUS_ATTRIBUTES[status], values or None)
        self._status = status
        _open_jobs.pop(id(call), None)

    def _end_block(self, error: BaseException | None) -> None:
        """Ends a ``with`` block's job (its call is the meter's latest block here)."""
        if self._retry:
            status = RETRIED
            named = self._retry_error if self._retry_error is not None else error
        else:
            status = SUCCEEDED if error is None else FAILED
            named = error
        block = self._block
        assert block is not None
        block.set_attribute(STATUS, status)
        if named is not None:
            block.set_attribute("error.type", _error_type(named))
        self._status = status
        if self.queue_wait is not None or self._output is not None:
            attributes = block.attributes
            if self.queue_wait is not None:
                queue_wait().record(self.queue_wait, attributes)
            if self._output is not None:
                output_size().record(self._output, attributes)

    def __repr__(self) -> str:
        state = self._status or "running"
        return f"<meterage.jobs.Job {self.name!r} queue={self.queue!r} {state}>"


def _check_error(error: object) -> None:
    if error is None or isinstance(error, BaseException | str):
        if isinstance(error, str) and not error:
            raise ValueError("error must not be an empty str")
        return
    if isinstance(error, type) and issubclass(error, BaseException):
        return
    raise TypeError(
        "error must be an exception, an exception class or an error.type str, not "
        f"{type(error).__name__}"
    )


def _error_type(error: BaseException | type[BaseException] | str) -> str:
    if isinstance(error, str):
        return error
    kind = error if isinstance(error, type) else type(error)
    return kind.__qualname__


async def _current_during(call: _native.OpenCall, steps: Awaitable[_T]) -> _T:
    _watch_running_loop()
    token = _CURRENT_CALL.set(call)
    try:
        return await steps
    finally:
        _CURRENT_CALL.reset(token)


_handoffs_installed = False
_watched_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None


def _watch_running_loop() -> None:
    """Tasks a coroutine job creates are charged to it: meterage's task factory on the
    running loop (once per loop)."""
    global _watched_loop
    loop = asyncio.get_running_loop()
    if _watched_loop is None or _watched_loop() is not loop:
        _handoff.watch_loop(loop)
        _watched_loop = weakref.ref(loop)


def _install_handoffs() -> None:
    """Charges the tasks and thread-pool work a job hands off to it (once per process)."""
    global _handoffs_installed
    if not _handoffs_installed:
        _handoff.install()
        _handoffs_installed = True


def _open(
    core: _native.MeterCore,
    name: str,
    queue: str | None,
    system: str | None,
    waited: float | None,
    probe: bool,
) -> Job:
    call = core.call()
    call.start(probe=probe or _native.traced_now())
    job = Job(call, None, name, queue, system, waited)
    _open_jobs[id(call)] = job
    return job


def current() -> Job | None:
    """The job running here (in its function, the tasks it creates and the threads it hands
    work to), or None.

    >>> import meterage.jobs
    >>> @meterage.jobs.job("current.demo", probes=())
    ... def work():
    ...     return meterage.jobs.current().name
    >>> work()
    'current.demo'
    >>> meterage.jobs.current() is None
    True
    """
    call = _CURRENT_CALL.get()
    if call is not None:
        return _open_jobs.get(id(call))
    blocks = _BLOCKS.get()
    return blocks[-1][1] if blocks else None


def report_output(nbytes: int) -> bool:
    """Adds ``nbytes`` to the output size of the job running here; False (and nothing
    recorded) when no job is running here, so library code can report unconditionally.

    >>> import meterage.jobs
    >>> meterage.jobs.report_output(10)
    False
    """
    job = current()
    if job is None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"nbytes must be an int (bytes), not {type(nbytes).__name__}")
        return False
    job.report_output(nbytes)
    return True


def start(
    name: str,
    *,
    queue: str | None = None,
    system: str | None = None,
    enqueued_at: float | datetime.datetime | None = None,
    attributes: Mapping[str, AttributeValue] | None = None,
    probes: Iterable[str] | None = None,
    sample: float | None = None,
    budget: float | None = None,
    probe: bool = False,
) -> Job:
    """Starts a job now and returns it: run its work with ``job.run(...)`` or ``await
    job.steps(...)``, and end it with ``job.end(error)``.

    ``name``: the task or function name; ``queue``: where it came from
    (``messaging.destination.name``); ``system``: ``messaging.system`` (what your worker
    is: ``"asyncio"``, ``"kafka"``, ...). ``enqueued_at``: when it was enqueued,
    ``time.time()`` seconds or a timezone-aware datetime: its queue wait is now less that.
    ``attributes``, ``probes``, ``sample``, ``budget``: as for ``meterage.meter``;
    ``probe=True`` probes this job whatever the sampler says. Bad arguments raise
    TypeError or ValueError naming the argument, and start nothing.

    >>> import asyncio, meterage.jobs
    >>> async def fetch(url):
    ...     await asyncio.sleep(0)
    ...     return len(url)
    >>> async def worker(url):
    ...     job = meterage.jobs.start("fetch", queue="urls", system="asyncio")
    ...     try:
    ...         size = await job.steps(fetch(url))
    ...     except BaseException as error:
    ...         job.end(error)
    ...         raise
    ...     job.end()
    ...     return size
    >>> asyncio.run(worker("https://example.org"))
    19
    """
    core = _meter_for(name, queue, system, attributes, probes, sample, budget)
    if not isinstance(probe, bool):
        raise TypeError(f"probe must be True or False, not {type(probe).__name__}")
    waited = None
    if enqueued_at is not None:
        waited = _wait_since(_timestamp_of(enqueued_at), time.time())
    _install_handoffs()
    return _open(core, name, queue, system, waited, probe)


EnqueuedAt = float | datetime.datetime | None


class JobMeter:
    """What ``job(...)`` returns: a decorator whose every call is a job, and a context
    manager whose ``with`` block is one job (both reusable)."""

    __slots__ = ("_core", "_enqueued_at", "_warned", "name", "queue", "system")

    def __init__(
        self,
        core: _native.MeterCore,
        name: str,
        queue: str | None,
        system: str | None,
        enqueued_at: EnqueuedAt | Callable[..., EnqueuedAt],
    ) -> None:
        self._core = core
        self.name = name
        self.queue = queue
        self.system = system
        self._enqueued_at = enqueued_at
        self._warned = False  # a bad enqueue time of a call was logged (once)

    def _waited(self, enqueued: object) -> float | None:
        if enqueued is None:
            return None
        return _wait_since(_timestamp_of(enqueued), time.time())

    def __enter__(self) -> Job:
        enqueued = self._enqueued_at
        if callable(enqueued):
            raise TypeError(
                "enqueued_at is a function (of a decorated job's arguments): a with block "
                "takes the enqueue time itself"
            )
        waited = self._waited(enqueued)
        block: _native.Call = self._core.__enter__()
        job = Job(None, block, self.name, self.queue, self.system, waited)
        # The block's job is the current one here; an outer job's call is not (until the
        # block ends).
        _BLOCKS.set((*_BLOCKS.get(), (self, job, _CURRENT_CALL.get())))
        _CURRENT_CALL.set(None)
        return job

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        blocks = _BLOCKS.get()
        # The latest block of this meter in this context (the native block it ends is the
        # latest of the meter's calls in this context too).
        index = len(blocks) - 1
        while index >= 0 and blocks[index][0] is not self:
            index -= 1
        if index < 0:
            raise RuntimeError(
                f'meterage.jobs: a with block of job "{self.name}" ended that never began '
                "in this context"
            )
        _, job, outer = blocks[index]
        _BLOCKS.set(blocks[:index] + blocks[index + 1 :])
        try:
            job._end_block(None if isinstance(exc, GeneratorExit) else exc)
        finally:
            self._core.__exit__(None, None, None)
            _CURRENT_CALL.set(outer)

    def __call__(self, function: _F) -> _F:
        """Decorates ``function`` (a function or an ``async def``): each call is a job."""
        if inspect.isclass(function) or not callable(function):
            raise TypeError(
                f"a job is a function or coroutine function, not {type(function).__name__}"
            )
        if inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function):
            raise TypeError(
                "a job is a function or coroutine function, not a generator function: its "
                "call would end before its work"
            )
        _install_handoffs()
        enqueued = self._enqueued_at
        if enqueued is not None and not callable(enqueued):
            raise TypeError(
                "enqueued_at of a decorated job must be a function of its arguments giving "
                "the enqueue time (or None): one time for every call cannot be right"
            )
        meter = self

        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def metered_coroutine(*args: Any, **kwargs: Any) -> Any:
                job = meter._start(args, kwargs)
                call = job._call
                assert call is not None
                _watch_running_loop()
                token = _CURRENT_CALL.set(call)
                try:
                    result = await call.steps(function(*args, **kwargs))
                except BaseException as error:
                    job.end(error)
                    raise
                finally:
                    _CURRENT_CALL.reset(token)
                job.end()
                return result

            return metered_coroutine  # type: ignore[return-value]

        @functools.wraps(function)
        def metered(*args: Any, **kwargs: Any) -> Any:
            job = meter._start(args, kwargs)
            call = job._call
            assert call is not None
            try:
                result = call.run(function, *args, **kwargs)
            except BaseException as error:
                job.end(error)
                raise
            job.end()
            return result

        return metered  # type: ignore[return-value]

    def _start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Job:
        enqueued = self._enqueued_at
        waited = None
        if enqueued is not None:
            assert callable(enqueued)
            waited = self._waited_per_call(enqueued, args, kwargs)
        return _open(self._core, self.name, self.queue, self.system, waited, False)

    def _waited_per_call(
        self, enqueued_at: Callable[..., EnqueuedAt], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> float | None:
        """A decorated job's queue wait from its arguments, or None: a time its function
        cannot give or that is not one (a message without it, NaN, a producer's clock
        ahead) leaves this job's wait unknown, logged once per job meter, and the job runs
        as it would unmetered. A time up to ``MAX_CLOCK_SKEW`` ahead is a wait of 0."""
        try:
            return self._waited(enqueued_at(*args, **kwargs))
        except Exception as error:  # the job must run whatever its message holds
            if not self._warned:
                self._warned = True
                _logger.warning(
                    "meterage: job %r (queue %r) has no queue wait: its enqueued_at "
                    "function failed or gave a bad time: %s: %s (logged once per job meter)",
                    self.name,
                    self.queue,
                    type(error).__name__,
                    error,
                )
            return None

    def __repr__(self) -> str:
        return f"<meterage.jobs.JobMeter {self.name!r} queue={self.queue!r}>"


@overload
def job(
    name: _F,
    /,
) -> _F: ...
@overload
def job(
    name: str,
    /,
    *,
    queue: str | None = ...,
    system: str | None = ...,
    enqueued_at: EnqueuedAt | Callable[..., EnqueuedAt] = ...,
    attributes: Mapping[str, AttributeValue] | None = ...,
    probes: Iterable[str] | None = ...,
    sample: float | None = ...,
    budget: float | None = ...,
) -> JobMeter: ...


def job(
    name: Any,
    /,
    *,
    queue: str | None = None,
    system: str | None = None,
    enqueued_at: EnqueuedAt | Callable[..., EnqueuedAt] = None,
    attributes: Mapping[str, AttributeValue] | None = None,
    probes: Iterable[str] | None = None,
    sample: float | None = None,
    budget: float | None = None,
) -> Any:
    """A job meter: ``@meterage.jobs.job("name", ...)`` makes each call of a function or
    ``async def`` a job; ``with meterage.jobs.job("name", ...) as job:`` makes a block one.

    A job that returns (or a block that ends) succeeded; one that raises failed, with
    ``error.type`` the exception's class (a cancelled coroutine: ``CancelledError``), and
    the exception propagates; ``current().retry(error)`` makes it end as retried. The
    settings are those of ``start``. ``enqueued_at``: for a block, the enqueue time; for
    a decorated function, a function of its arguments that gives it (or None). ``@job``
    without a name names the job after the function's ``__qualname__``.

    A block's job is metered in its thread like a ``with meter:`` block: work it hands to
    thread pools is not charged to it (a decorated function's is), and a block that awaits
    is charged what other tasks run meanwhile (decorate the ``async def`` instead).

    >>> import meterage.jobs, time
    >>> @meterage.jobs.job("email.send", queue="email", enqueued_at=lambda m: m["sent"])
    ... def send(message):
    ...     return message["to"]
    >>> send({"to": "ada@example.org", "sent": time.time() - 0.5})
    'ada@example.org'
    """
    if callable(name) and not isinstance(name, str):
        function = name
        qualname = getattr(function, "__qualname__", None) or getattr(function, "__name__", None)
        if not isinstance(qualname, str) or not qualname:
            qualname = type(function).__qualname__
        return job(qualname)(function)
    _text("name", name, optional=False)
    if enqueued_at is not None and not callable(enqueued_at):
        _timestamp_of(enqueued_at)  # checked now, where the mistake is
    core = _meter_for(name, queue, system, attributes, probes, sample, budget)
    return JobMeter(core, name, queue, system, enqueued_at)


# --- queue depth -------------------------------------------------------------------------


class QueueDepth:
    """A queue's length, registered by ``queue_depth``; ``remove()`` unregisters it."""

    __slots__ = ("__weakref__", "callback", "queue", "system")

    def __init__(self, queue: str, system: str | None, callback: Callable[[], float | None]):
        self.queue = queue
        self.system = system
        self.callback = callback

    @property
    def attributes(self) -> dict[str, str]:
        attributes = {DESTINATION: self.queue}
        if self.system is not None:
            attributes[SYSTEM] = self.system
        return attributes

    def read(self) -> float | None:
        """The callback's value now (an int or a finite float >= 0, as it gave it), or None
        (it had none, raised or gave something else: logged once per registration)."""
        try:
            value = self.callback()
        except Exception:
            _log_once(self, "its callback raised", exc_info=True)
            return None
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            _log_once(self, f"its callback gave {value!r}, not a number >= 0")
            return None
        return value

    def remove(self) -> bool:
        """Stops exporting it; False if it was removed or replaced already."""
        with _depth_lock:
            key = (self.system, self.queue)
            if _depths.get(key) is self:
                del _depths[key]
                return True
            return False

    def __repr__(self) -> str:
        return f"<meterage.jobs.QueueDepth queue={self.queue!r} system={self.system!r}>"


_depths: dict[tuple[str | None, str], QueueDepth] = {}
_depth_lock = threading.Lock()
_logged: weakref.WeakSet[QueueDepth] = weakref.WeakSet()


def _log_once(depth: QueueDepth, what: str, *, exc_info: bool = False) -> None:
    if depth in _logged:
        return
    _logged.add(depth)
    _logger.warning(
        "meterage: the depth of queue %r (%s) is not exported: %s",
        depth.queue,
        depth.system,
        what,
        exc_info=exc_info,
    )


def queue_depth(
    queue: str, callback: Callable[[], float | None], *, system: str | None = None
) -> QueueDepth:
    """Exports ``callback()`` (the number of jobs waiting in ``queue``, or None when it
    cannot tell) as the gauge ``job.queue.depth`` at each collection, with
    ``messaging.destination.name`` = ``queue`` and ``messaging.system`` = ``system``.

    Registering a queue again (same ``queue`` and ``system``) replaces the first
    registration. The gauge goes to the OpenTelemetry providers meterage is attached to:
    the global one (also when it is set later, e.g. by ``meterage.otel.configure()``), and
    those attached with ``meterage.otel.attach(provider)`` before this call. The callback
    runs at collection time, in the collecting thread: keep it quick (one ``LLEN``).

    >>> import meterage.jobs
    >>> waiting = ["a", "b"]
    >>> depth = meterage.jobs.queue_depth("uploads", lambda: len(waiting), system="threads")
    >>> meterage.jobs.read_queue_depths()[("threads", "uploads")]
    2
    >>> depth.remove()
    True
    """
    name = _text("queue", queue, optional=False) or ""
    owner = _text("system", system, optional=True)
    if not callable(callback):
        raise TypeError(
            f"callback must be a function of no arguments, not {type(callback).__name__}"
        )
    registration = QueueDepth(name, owner, callback)
    with _depth_lock:
        _depths[(owner, name)] = registration
    _export_depths()
    return registration


def read_queue_depths() -> dict[tuple[str | None, str], float]:
    """Every registered queue's depth now, by (system, queue): what a collection exports
    (queues whose callback had no value are left out)."""
    with _depth_lock:
        registered = list(_depths.values())
    read = {}
    for depth in registered:
        value = depth.read()
        if value is not None:
            read[(depth.system, depth.queue)] = value
    return read


# The providers that have the gauge; the global API's proxy forwards it to the provider
# that is made global later (OpenTelemetry allows one, once).
_gauged: weakref.WeakSet[Any] = weakref.WeakSet()
_gauged_global = False
_gauge_lock = threading.Lock()


def _observe(provider_ref: Callable[[], Any]) -> Callable[[CallbackOptions], list[Observation]]:
    from opentelemetry.metrics import Observation

    def observe(options: CallbackOptions) -> list[Observation]:
        provider = provider_ref()
        if provider is None or not _attached(provider):
            return []
        with _depth_lock:
            registered = list(_depths.values())
        observed = []
        for depth in registered:
            value = depth.read()
            if value is not None:
                observed.append(Observation(value, depth.attributes))
        return observed

    return observe


def _attached(provider: Any) -> bool:
    """Whether meterage is attached to ``provider`` (only then are its metrics exported)."""
    import sys

    attach = sys.modules.get("meterage.otel._attach")
    return attach is not None and attach.attachment_of(provider) is not None


def _make_gauge(meter: Any, provider_ref: Callable[[], Any]) -> None:
    meter.create_observable_gauge(
        QUEUE_DEPTH,
        callbacks=[_observe(provider_ref)],
        unit="{job}",
        description="Jobs waiting in the queue.",
    )


def _export_depths() -> None:
    """Puts the gauge on the global provider (or the API's proxy for it) and on every
    provider meterage is attached to, once each."""
    global _gauged_global
    import sys

    try:
        from opentelemetry import metrics as api
    except ImportError:  # no OpenTelemetry: read_queue_depths() only
        return
    with _gauge_lock:
        current = api.get_meter_provider()
        if not _gauged_global:
            _gauged_global = True
            # The proxy (nothing set yet) forwards the instrument to the provider set
            # later; an SDK provider set already gets it directly.
            meter = api.get_meter("meterage", meterage.__version__)
            _make_gauge(meter, api.get_meter_provider)
            _gauged.add(current)
        otel = sys.modules.get("meterage.otel")
        if otel is None:
            return
        for provider in otel.attached_providers():
            if provider in _gauged or provider is api.get_meter_provider():
                continue
            _gauged.add(provider)
            meter = provider.get_meter("meterage", meterage.__version__)
            _make_gauge(meter, weakref.ref(provider))
