"""``python pool_calls.py N METHOD HOW [MAXTASKS]``: ``multiprocessing.Pool(4).map`` over N
metered calls with the METHOD start method (fork, forkserver, spawn), each worker replaced
after MAXTASKS calls when given, then prints ``RESULT`` and JSON:

- ``during``: the calls in the parent's ``meterage.snapshot()`` once ``map`` has returned,
  the workers still alive;
- ``after``: the same once the pool has ended (``with Pool(...)`` terminates its workers:
  SIGTERM);
- ``calls``: per call, ``[pid, count]``: the worker that ran it and the calls of the
  operation in that worker's own snapshot right after it;
- ``parent``: the parent's PID.

HOW: ``env`` (multiprocess mode as the environment says: ``METERAGE_MULTIPROCESS``) or
``enable`` (``meterage.multiprocess.enable()`` in the parent, before the pool is made).
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import sys

import meterage

OPERATION = "workers.pool.call"


@meterage.meter(OPERATION, probes=("cpu",), sample=1.0)
def metered(index: int) -> int:
    return index


def calls() -> int:
    return sum(s.count for s in meterage.snapshot() if s.operation == OPERATION)


def call(index: int) -> tuple[int, int]:
    metered(index)
    return os.getpid(), calls()


def main() -> None:
    count, method, how = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    maxtasks = int(sys.argv[4]) if len(sys.argv) > 4 else None
    if how == "enable":
        importlib.import_module("meterage.multiprocess").enable()
    elif how != "env":
        raise SystemExit(f"HOW must be env or enable, not {how!r}")
    context = multiprocessing.get_context(method)
    with context.Pool(4, maxtasksperchild=maxtasks) as pool:
        results = pool.map(call, range(count), chunksize=1)
        during = calls()
    after = calls()
    report = {"during": during, "after": after, "calls": results, "parent": os.getpid()}
    print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
