"""RQ: every job a worker performs is a job (``meterage.jobs``).

```sh
rq worker --worker-class meterage.integrations.rq.MeteredWorker          # forks a horse per job
rq worker --worker-class meterage.integrations.rq.MeteredSimpleWorker    # runs jobs itself
METERAGE_MULTIPROCESS=1 rq worker --worker-class meterage.integrations.rq.MeteredWorker
```

or ``meterage.integrations.rq.instrument()`` in the worker's settings module (``rq worker
-c settings``) or before ``Worker(...).work()``, for any worker class. Each job performed
is a call of operation ``messaging.process`` with ``messaging.system`` = ``rq``,
``messaging.destination.name`` = its queue, ``meterage.job.name`` = its function's name
(``job.func_name``) and ``meterage.job.status``:

* ``succeeded`` — it returned;
* ``retried`` — it raised and has retries left (``enqueue(..., retry=Retry(max=...))``),
  or it returned an ``rq.Retry`` within its maximum; ``error.type`` is what it raised;
* ``failed`` — it raised with no retries left (its class is ``error.type``, e.g.
  ``JobTimeoutException`` past its timeout), or returned a ``Retry`` past its maximum
  (``error.type`` ``Retry``).

Its duration and probes are the job function's (``Job.perform``); its queue wait is RQ's
own record of it, ``job.started_at - job.enqueued_at`` (a retried or scheduled job is
enqueued again when it becomes due). With the default forking worker each job runs in a
work horse forked for it that exits at once: set ``METERAGE_MULTIPROCESS=1`` so that the
horses' jobs reach the worker's export. See docs/jobs.md.
"""

from __future__ import annotations

import datetime
import functools
import threading
import time
from collections.abc import Iterable
from typing import Any

import rq

from meterage import _handoff, jobs

__all__ = ["SYSTEM", "MeteredSimpleWorker", "MeteredWorker", "instrument", "queue_depth"]

#: ``messaging.system`` of RQ's jobs.
SYSTEM = "rq"

_lock = threading.Lock()
_settings: dict[str, Any] = {"probes": None, "sample": None, "budget": None}


def instrument(
    *,
    probes: Iterable[str] | None = None,
    sample: float | None = None,
    budget: float | None = None,
) -> None:
    """Meters every job this process (and the work horses it forks) performs, whatever the
    worker class. ``probes``, ``sample`` and ``budget`` are as for ``meterage.meter`` (bad
    values raise TypeError or ValueError); a later call's apply from then on. Idempotent."""
    # Checked now: a bad setting raises here, not in a job.
    probes = jobs._check_settings(probes, sample, budget)
    with _lock:
        _settings.update(probes=probes, sample=sample, budget=budget)
        perform = rq.job.Job.perform
        if getattr(perform, "__meterage_original__", None) is not None:
            return
        _handoff.install()
        rq.job.Job.perform = _metered(perform)  # type: ignore[method-assign]


class MeteredWorker(rq.Worker):
    """RQ's default forking ``Worker``, with ``instrument()`` called when it is made:
    ``rq worker --worker-class meterage.integrations.rq.MeteredWorker``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        instrument(**_settings)
        super().__init__(*args, **kwargs)


class MeteredSimpleWorker(rq.SimpleWorker):
    """RQ's ``SimpleWorker`` (jobs run in the worker's own process), with ``instrument()``
    called when it is made."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        instrument(**_settings)
        super().__init__(*args, **kwargs)


def queue_depth(queue: rq.Queue) -> jobs.QueueDepth:
    """Exports the number of jobs waiting in ``queue`` (``queue.count``, one ``LLEN``) as
    ``job.queue.depth`` at each collection (``meterage.jobs.queue_depth``)."""
    if not isinstance(queue, rq.Queue):
        raise TypeError(f"queue must be an rq.Queue, not {type(queue).__name__}")

    def depth() -> int:
        return int(queue.count)

    return jobs.queue_depth(queue.name, depth, system=SYSTEM)


def _seconds(value: object) -> float | None:
    if not isinstance(value, datetime.datetime):
        return None
    when = value
    if when.tzinfo is None:  # RQ before 2 kept naive UTC times
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def _name_of(job: rq.job.Job) -> str:
    try:
        name = job.func_name
    except Exception:  # a job that cannot be deserialized fails in perform anyway
        name = None
    return name if isinstance(name, str) and name else "unknown"


def _metered(perform: Any) -> Any:
    @functools.wraps(perform)
    def metered_perform(self: rq.job.Job) -> Any:
        enqueued = _seconds(self.enqueued_at)
        started = _seconds(self.started_at)
        if started is None:
            started = time.time()
        waited = None if enqueued is None else max(0.0, started - enqueued)
        name = _name_of(self)
        queue = self.origin or None
        settings = _settings
        core = jobs._meter_for(
            name, queue, SYSTEM, None, settings["probes"], settings["sample"], settings["budget"]
        )
        job = jobs._open(core, name, queue, SYSTEM, waited, False)
        try:
            result = job.run(perform, self)
        except BaseException as error:
            # RQ retries a job that raised while it has retries left (handle_job_failure).
            if self.should_retry:
                job.retry(error)
            job.end(error)
            raise
        if isinstance(result, rq.Retry):
            # A job that returns Retry is enqueued again, unless past its maximum.
            retries = getattr(self, "number_of_retries", None) or 0
            if retries and retries >= result.max:
                job.end("Retry")
            else:
                job.retry()
                job.end()
        else:
            job.end()
        return result

    metered_perform.__meterage_original__ = perform  # type: ignore[attr-defined]
    return metered_perform
