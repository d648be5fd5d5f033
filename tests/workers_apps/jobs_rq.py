"""RQ jobs for the meterage.integrations.rq tests (enqueued by name: ``jobs_rq.ok``, ...).

The worker (``--worker-class meterage.integrations.rq.MeteredWorker``) meters each in the
work horse it forks for it; ``jobs_rq.report`` answers what the worker's group has
recorded (in multiprocess mode any member's snapshot is the group's).
"""

from __future__ import annotations

import time
from typing import Any

import jobs_work
import rq

import meterage.jobs


def ok(index: int, size: int) -> float:
    """Reports an output of ``size`` bytes; answers when it started."""
    started = time.time()
    meterage.jobs.report_output(size)
    return started


def burn(index: int) -> int:
    return jobs_work.burn()


def fail(index: int) -> None:
    raise KeyError(index)


def flaky(failures: int, retries: int) -> int:
    """Fails its first ``failures`` attempts (enqueued with ``Retry(max=retries)``)."""
    job = rq.get_current_job()
    assert job is not None and job.retries_left is not None
    attempt = retries - job.retries_left
    if attempt < failures:
        raise ConnectionError(f"attempt {attempt}")
    return attempt


def flaky_return(failures: int, retries: int) -> Any:
    """Asks for a retry (returns ``rq.Retry``) in its first ``failures`` attempts."""
    job = rq.get_current_job()
    assert job is not None
    attempt = job.number_of_retries or 0
    if attempt < failures:
        return rq.Retry(max=retries)
    return attempt


def report() -> dict[str, Any]:
    return jobs_work.group_report()
