"""``python celery_client.py TASK N``: sends N tasks named TASK (argument: 0 .. N-1) to the
broker in ``CELERY_BROKER_URL``, waits for their results (``CELERY_RESULT_BACKEND``) and
prints ``RESULT`` and the results as JSON. A process of its own, so that the tests' process
keeps no Celery connections or threads."""

from __future__ import annotations

import json
import os
import sys

from celery import Celery


def main() -> None:
    name, count = sys.argv[1], int(sys.argv[2])
    client = Celery(
        "celery_client",
        broker=os.environ["CELERY_BROKER_URL"],
        backend=os.environ["CELERY_RESULT_BACKEND"],
    )
    client.conf.broker_connection_retry_on_startup = True
    sent = [client.send_task(name, args=[index]) for index in range(count)]
    results = [result.get(timeout=30) for result in sent]
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
