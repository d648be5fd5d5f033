"""``python jobs_celery_client.py send PLAN``: sends the tasks of PLAN (JSON: a list of
``[task name, args, queue or null]``) to the broker in ``CELERY_BROKER_URL``, stamping each
message's publication time (``meterage.integrations.celery.instrument()``), and prints
``RESULT`` and JSON: per task its id and the time.time() just before it was sent (after a
first message to queue ``warmup``, which no worker consumes, has set up the connections).

``python jobs_celery_client.py wait ID...``: waits for the results of those tasks
(``CELERY_RESULT_BACKEND``; a failed task's result is ``null``) and prints them.

A process of its own, so that the tests' process keeps no Celery connections or threads.
"""

from __future__ import annotations

import json
import os
import sys
import time

from celery import Celery
from celery.result import AsyncResult

import meterage.integrations.celery


def client() -> Celery:
    app = Celery(
        "jobs_celery_client",
        broker=os.environ["CELERY_BROKER_URL"],
        backend=os.environ["CELERY_RESULT_BACKEND"],
    )
    app.conf.broker_connection_retry_on_startup = True
    meterage.integrations.celery.instrument()
    return app


def main() -> None:
    app = client()
    if sys.argv[1] == "send":
        # The first message sets up the broker and result connections: not one of those
        # whose send time is taken.
        app.send_task("jobs.ok", args=[-1, 0], queue="warmup")
        sent = []
        for name, args, queue in json.loads(sys.argv[2]):
            before = time.time()
            result = app.send_task(name, args=args, queue=queue)
            sent.append([result.id, before])
        print("RESULT " + json.dumps(sent), flush=True)
    else:
        results = []
        for task_id in sys.argv[2:]:
            result = AsyncResult(task_id, app=app)
            try:
                results.append(result.get(timeout=60))
            except Exception:
                results.append(None)
        print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
