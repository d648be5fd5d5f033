"""A Celery app (``celery -A celery_app worker``) with a metered task.

Broker and result backend come from ``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND``.
The worker's main process imports this module, so the export is set up there
(``WORKERS_APP_EXPORT``), before the prefork pool forks its processes, which run the tasks
and exit with ``os._exit``.
"""

from __future__ import annotations

from typing import Any

import workers_export
import workers_job
from celery import Celery

OPERATION = "workers.celery.task"

workers_export.setup()

app = Celery("celery_app")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)

metered_job = workers_job.metered(OPERATION)


@app.task(name="celery_app.metered_task")
def metered_task(index: int) -> int:
    return metered_job(index)


@app.task(name="celery_app.run_and_report")
def run_and_report(index: int) -> dict[str, Any]:
    """Runs the metered job, then answers what this pool process's own snapshot holds."""
    metered_job(index)
    return workers_job.own_counts(OPERATION)
