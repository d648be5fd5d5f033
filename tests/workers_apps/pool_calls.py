"""``python pool_calls.py N METHOD HOW``: ``multiprocessing.Pool(4).map`` over N metered
calls with the METHOD start method (fork, forkserver, spawn), then prints ``RESULT`` and
``{"calls": the parent's own count of them, "pids": the workers that ran them}``.

HOW: ``env`` (multiprocess mode as the environment says: ``METERAGE_MULTIPROCESS``) or
``enable`` (``meterage.multiprocess.enable()`` before the pool is made).
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
    return os.getpid()


def call(index: int) -> int:
    return metered(index)


def main() -> None:
    count, method, how = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if how == "enable":
        importlib.import_module("meterage.multiprocess").enable()
    elif how != "env":
        raise SystemExit(f"HOW must be env or enable, not {how!r}")
    with multiprocessing.get_context(method).Pool(4) as pool:
        pids = pool.map(call, range(count), chunksize=1)
    calls = sum(s.count for s in meterage.snapshot() if s.operation == OPERATION)
    print("RESULT " + json.dumps({"calls": calls, "pids": sorted(set(pids))}), flush=True)


if __name__ == "__main__":
    main()
