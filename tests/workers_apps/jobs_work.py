"""What the jobs of the meterage.jobs integration tests do, and how they report.

``burn(ns)`` spends exactly ``ns`` of this thread's CPU (the clock the cpu probe reads);
``group_report()`` is what the worker's process group has recorded for every job
(``messaging.process``) and for the jobs' queue-wait and output-size histograms, as plain
JSON-able rows (in multiprocess mode any member's snapshot is the group's).
"""

from __future__ import annotations

import os
import time
from typing import Any

import meterage
import meterage.jobs
import meterage.multiprocess

#: What each burning job spends of its thread's CPU (set by the test).
BURN_NS = int(os.environ.get("JOBS_BURN_NS", "20000000"))
#: The job names whose series are not reported (the report job itself).
REPORT = "jobs.report"


def burn(ns: int = BURN_NS) -> int:
    start = time.thread_time_ns()
    now = start
    while now - start < ns:
        now = time.thread_time_ns()
    return now - start


def _histogram(snapshot: Any) -> dict[str, Any]:
    return {
        "count": snapshot.count,
        "sum": snapshot.sum,
        "min": snapshot.min if snapshot.count else None,
        "max": snapshot.max if snapshot.count else None,
    }


def group_report() -> dict[str, Any]:
    """Every job series (but the report's) and the jobs' value histograms, with the PIDs
    of the group's members."""
    calls = []
    values = []
    for series in meterage.snapshot():
        attributes = series.attributes
        if attributes.get(meterage.jobs.JOB_NAME) == REPORT:
            continue
        if series.kind == "call" and series.operation == meterage.jobs.OPERATION:
            calls.append(
                {
                    "attributes": attributes,
                    "count": series.count,
                    "sampled": series.sampled,
                    "histograms": {
                        key: _histogram(value) for key, value in series.histograms.items()
                    },
                }
            )
        elif series.kind == "histogram" and series.name in (
            meterage.jobs.QUEUE_WAIT,
            meterage.jobs.OUTPUT_SIZE,
        ):
            (snapshot,) = series.histograms.values()
            values.append({"name": series.name, "attributes": attributes, **_histogram(snapshot)})
    return {
        "pid": os.getpid(),
        "members": meterage.multiprocess.members(),
        "multiprocess": meterage.multiprocess.is_enabled(),
        "calls": calls,
        "values": values,
    }
