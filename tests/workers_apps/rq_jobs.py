"""RQ jobs (enqueued by name: ``rq_jobs.metered_job``, ``rq_jobs.run_and_report``).

The default ``rq.Worker`` imports this module in the work horse it forks for a job (or
finds it imported already); the horse exits with ``os._exit`` once the job is done.
"""

from __future__ import annotations

from typing import Any

import workers_job

OPERATION = "workers.rq.job"

metered_job = workers_job.metered(OPERATION)


def run_and_report(index: int) -> dict[str, Any]:
    """Runs the metered job, then answers what the horse's own snapshot holds for it."""
    metered_job(index)
    return workers_job.own_counts(OPERATION)
