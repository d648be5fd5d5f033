"""Celery: every task a worker runs is a job (``meterage.jobs``).

```python no-run
from celery import Celery

import meterage.integrations.celery

app = Celery("tasks")
meterage.integrations.celery.instrument(app)  # in the module the worker imports
```

Call ``instrument`` where the worker *and* the processes that send tasks import it (the
app's module): the worker meters each task, the senders stamp each message with the time
it was sent, which gives the task's queue wait. Each task execution is a call of operation
``messaging.process`` with ``messaging.system`` = ``celery``,
``messaging.destination.name`` = the routing key it was delivered with (the queue's name
under Celery's default routing), ``meterage.job.name`` = the task's name and
``meterage.job.status``:

* ``succeeded`` — it returned (also when it raised ``Ignore``, as ``self.replace()`` does:
  its work goes on in another task);
* ``retried`` — it raised ``Retry`` (``self.retry()``, ``autoretry_for``), or ``Reject``
  with ``requeue=True``; ``error.type`` is the exception the retry was for, if any;
* ``failed`` — it raised anything else (its class is ``error.type``), or Celery failed it
  after it ran (a result it could not store).

Its duration runs from Celery's ``task_prerun`` signal to ``task_postrun`` (Celery's own
bookkeeping included, as in its "succeeded in" runtime); its probes (CPU, IO, ...) are the
task body's own, with the work it hands to threads and asyncio tasks. The queue wait is the
time from the message's publication (or its ETA/countdown, when later) to the start.
Works with every pool (prefork, threads, solo) and with multiprocess mode
(``METERAGE_MULTIPROCESS=1 celery -A tasks worker``): the prefork pool's processes are
members of the worker's group. See docs/jobs.md.
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

from meterage import _handoff, jobs

__all__ = ["HEADER", "SYSTEM", "instrument", "queue_depth"]

#: The message header the senders put their publication time in (time.time() seconds).
HEADER = "meterage_enqueued_at"
#: ``messaging.system`` of Celery's jobs.
SYSTEM = "celery"

_lock = threading.Lock()
_connected = False
#: The apps whose tasks are metered (unless _every_app).
_apps: weakref.WeakSet[Any] = weakref.WeakSet()
_every_app = False
_settings: dict[str, Any] = {"probes": None, "sample": None, "budget": None}


class _Running:
    """One task execution's job, from ``task_prerun`` to ``task_postrun``."""

    __slots__ = ("failure", "in_body", "job", "raised", "reason", "task", "task_id", "token")

    def __init__(self, job: jobs.Job, task: Any, task_id: str | None) -> None:
        self.job = job
        self.task = task
        self.task_id = task_id
        self.token: contextvars.Token[_Running | None] | None = None
        #: What the task body raised, what task_failure and task_retry reported.
        self.raised: BaseException | None = None
        self.failure: BaseException | None = None
        self.reason: BaseException | None = None
        self.in_body = False


_RUNNING: contextvars.ContextVar[_Running | None] = contextvars.ContextVar(
    "meterage.integrations.celery", default=None
)


def instrument(
    app: Any = None,
    *,
    probes: Iterable[str] | None = None,
    sample: float | None = None,
    budget: float | None = None,
) -> None:
    """Meters the tasks of ``app`` (None: of every Celery app in this process) as jobs, and
    stamps the messages this process sends with their publication time.

    Call it when the app's module is imported, in the worker (before it starts, so that
    the tasks' tracers are built with the metering) and in the processes that send tasks.
    ``probes``, ``sample`` and ``budget`` are as for ``meterage.meter`` (bad values raise
    TypeError or ValueError); a later call's apply from then on. Idempotent.
    """
    global _connected, _every_app
    from celery import Celery, signals  # type: ignore[import-untyped]

    if app is not None and not isinstance(app, Celery):
        raise TypeError(f"app must be a Celery application or None, not {type(app).__name__}")
    # Checked now: a bad setting raises here, not in a worker's task.
    probes = jobs._check_settings(probes, sample, budget)
    with _lock:
        _settings.update(probes=probes, sample=sample, budget=budget)
        if app is None:
            _every_app = True
        else:
            _apps.add(app)
        if _connected:
            return
        _handoff.install()
        _patch_tracer()
        signals.before_task_publish.connect(_stamp, weak=False, dispatch_uid=HEADER)
        signals.task_prerun.connect(_prerun, weak=False, dispatch_uid=HEADER)
        signals.task_failure.connect(_failure, weak=False, dispatch_uid=HEADER)
        signals.task_retry.connect(_retry, weak=False, dispatch_uid=HEADER)
        signals.task_postrun.connect(_postrun, weak=False, dispatch_uid=HEADER)
        _connected = True


def queue_depth(app: Any, queue: str = "celery") -> jobs.QueueDepth:
    """Exports the number of messages waiting in ``queue`` on ``app``'s broker as
    ``job.queue.depth`` (``meterage.jobs.queue_depth``), read at each collection over a
    broker connection of its own (redis: the ``LLEN`` of the queue's lists)."""
    if not isinstance(queue, str) or not queue:
        raise TypeError(f"queue must be a non-empty str, not {queue!r}")

    def depth() -> int:
        with app.connection_for_read() as connection:
            try:
                declared = connection.default_channel.queue_declare(queue=queue, passive=True)
            except connection.channel_errors as error:
                # redis removes an empty list: no queue is no message
                if "NOT_FOUND" in str(error) or getattr(error, "code", None) == 404:
                    return 0
                raise
            return int(declared.message_count)

    return jobs.queue_depth(queue, depth, system=SYSTEM)


# --- the sender ------------------------------------------------------------------------


def _stamp(sender: Any = None, headers: Any = None, **_: Any) -> None:
    """before_task_publish: the message's publication time (a retry is published again, and
    so stamped again)."""
    if isinstance(headers, dict):
        headers[HEADER] = time.time()


# --- the worker ------------------------------------------------------------------------


def _wanted(task: Any) -> bool:
    return _every_app or getattr(task, "_app", None) in _apps


def _patch_tracer() -> None:
    """Celery calls a task's body through a tracer it builds per task (in each pool process,
    in the worker's consumer, for ``apply``); the task's ``run`` is wrapped just before, so
    that the body runs as a step of its job."""
    from celery.app import trace  # type: ignore[import-untyped]

    original = trace.build_tracer
    if getattr(original, "__meterage_original__", None) is not None:
        return

    @functools.wraps(original)
    def build_tracer(name: Any, task: Any, *args: Any, **kwargs: Any) -> Any:
        _wrap_run(task)
        return original(name, task, *args, **kwargs)

    build_tracer.__meterage_original__ = original  # type: ignore[attr-defined]
    trace.build_tracer = build_tracer
    # The consumer took the name when it was imported (if it was already).
    consumer = sys.modules.get("celery.worker.consumer.consumer")
    if consumer is not None and getattr(consumer, "build_tracer", None) is original:
        consumer.build_tracer = build_tracer  # type: ignore[attr-defined]


def _wrap_run(task: Any) -> None:
    run = getattr(task, "run", None)
    if run is None or getattr(run, "__meterage_job__", False):
        return

    @functools.wraps(run)
    def metered_run(*args: Any, **kwargs: Any) -> Any:
        running = _RUNNING.get()
        if running is None or running.task is not task or running.in_body:
            return run(*args, **kwargs)  # called directly, or again from inside itself
        running.in_body = True
        try:
            return running.job.run(run, *args, **kwargs)
        except BaseException as error:
            running.raised = error
            raise
        finally:
            running.in_body = False

    metered_run.__meterage_job__ = True  # type: ignore[attr-defined]
    task.run = metered_run


def _queue_of(request: Any) -> str | None:
    info = getattr(request, "delivery_info", None)
    if isinstance(info, dict):
        key = info.get("routing_key")
        if isinstance(key, str) and key:
            return key
    return None


def _due_time(request: Any) -> float | None:
    """When the task became due: its publication, or its ETA when later (None: unknown)."""
    stamped = getattr(request, HEADER, None)
    if stamped is None and isinstance(getattr(request, "headers", None), dict):
        stamped = request.headers.get(HEADER)
    if isinstance(stamped, bool) or not isinstance(stamped, int | float):
        return None
    due = float(stamped)
    eta = getattr(request, "eta", None)
    if eta:
        try:
            when = (
                eta if isinstance(eta, datetime.datetime) else datetime.datetime.fromisoformat(eta)
            )
            if when.tzinfo is None:
                when = when.replace(tzinfo=datetime.timezone.utc)
            due = max(due, when.timestamp())
        except (TypeError, ValueError):
            pass
    return due


def _prerun(sender: Any = None, task_id: Any = None, task: Any = None, **_: Any) -> None:
    if task is None or not _wanted(task):
        return
    started = time.time()
    request = task.request
    due = _due_time(request)
    # Clocks of the sender and the worker may differ: a start "before" it was due waited 0.
    waited = None if due is None else max(0.0, started - due)
    queue = _queue_of(request)
    name = task.name
    settings = _settings
    core = jobs._meter_for(
        name, queue, SYSTEM, None, settings["probes"], settings["sample"], settings["budget"]
    )
    running = _Running(jobs._open(core, name, queue, SYSTEM, waited, False), task, task_id)
    running.token = _RUNNING.set(running)


def _running_for(task_id: Any) -> _Running | None:
    running = _RUNNING.get()
    if running is None or running.task_id != task_id:
        return None
    return running


def _failure(sender: Any = None, task_id: Any = None, exception: Any = None, **_: Any) -> None:
    running = _running_for(task_id)
    if running is not None and isinstance(exception, BaseException):
        running.failure = exception


def _retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    running = _running_for(getattr(request, "id", None))
    if running is not None and isinstance(reason, BaseException):
        running.reason = reason


def _postrun(sender: Any = None, task_id: Any = None, state: Any = None, **_: Any) -> None:
    running = _running_for(task_id)
    if running is None:
        return
    if running.token is not None:
        try:
            _RUNNING.reset(running.token)
        except ValueError:  # another context: the one prerun ran in is gone anyway
            _RUNNING.set(None)
    _end(running, state)


def _end(running: _Running, state: Any) -> None:
    job = running.job
    raised = running.raised
    if state == "SUCCESS" or state == "IGNORED":
        job.end()
    elif state == "RETRY":
        reason = running.reason if running.reason is not None else raised
        cause = getattr(reason, "exc", None)
        job.retry(cause if isinstance(cause, BaseException) else None)
        job.end()
    elif state == "REJECTED" and getattr(raised, "requeue", False) is True:
        job.retry()  # Reject(requeue=True): the message goes back to its queue
        job.end()
    else:
        error: BaseException | str = raised or running.failure or str(state or "FAILURE")
        job.end(error)
