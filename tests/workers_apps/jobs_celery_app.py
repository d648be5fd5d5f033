"""A Celery app (``celery -A jobs_celery_app worker``) instrumented with
``meterage.integrations.celery``: its tasks succeed, fail, retry, burn CPU and report
output sizes, and ``jobs.report`` answers what the worker's group has recorded.

Broker and result backend come from ``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND``;
the export from ``WORKERS_APP_EXPORT`` (workers_export). The worker's main process imports
this module, so it instruments the app and registers the depths of its queue ``celery`` and
of queue ``held`` (which no worker consumes) before the prefork pool forks its processes.
"""

from __future__ import annotations

import time
from typing import Any

import jobs_work
import workers_export
from celery import Celery, signals

import meterage.integrations.celery
import meterage.jobs

workers_export.setup()

app = Celery("jobs_celery_app")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)
# Every task probed: the tests check each task's CPU.
meterage.integrations.celery.instrument(app, sample=1.0)
HELD = "held"
meterage.integrations.celery.queue_depth(app, HELD)
meterage.integrations.celery.queue_depth(app, "celery")


#: When each task began here, by task id: a task_prerun receiver of the app's own, called
#: right after meterage's (connected first, by instrument()).
_began: dict[str, float] = {}


@signals.task_prerun.connect
def _note_start(task_id: str | None = None, **_: Any) -> None:
    if task_id is not None:
        _began[task_id] = time.time()


@app.task(bind=True, name="jobs.ok")
def ok(self: Any, index: int, size: int) -> float:
    """Reports an output of ``size`` bytes; answers when it began (its prerun)."""
    meterage.jobs.report_output(size)
    return _began.pop(self.request.id)


@app.task(name="jobs.burn")
def burn(index: int) -> int:
    return jobs_work.burn()


@app.task(name="jobs.fail")
def fail(index: int) -> None:
    raise KeyError(index)


@app.task(bind=True, name="jobs.flaky", max_retries=2)
def flaky(self: Any, failures: int) -> int:
    """Fails its first ``failures`` attempts (each retried at once, up to 2 retries)."""
    if self.request.retries < failures:
        raise self.retry(exc=ConnectionError(f"attempt {self.request.retries}"), countdown=0)
    return self.request.retries


@app.task(name=jobs_work.REPORT)
def report() -> dict[str, Any]:
    return jobs_work.group_report()
