"""The metered job the RQ and Celery tests run: exact CPU and IO in each call.

Each call burns a little CPU and moves ``PAYLOAD`` bytes through a pipe (one write and one
read syscall), so its ``io.write`` and ``io.read`` are exactly ``PAYLOAD`` bytes.
"""

from __future__ import annotations

import os
from typing import Any

import meterage

PAYLOAD = 4096


def _work(index: int) -> int:
    total = sum(i * i for i in range(20_000))
    reader, writer = os.pipe()
    try:
        os.write(writer, b"x" * PAYLOAD)
        received = os.read(reader, PAYLOAD)
    finally:
        os.close(reader)
        os.close(writer)
    assert len(received) == PAYLOAD and total > 0
    return index


def metered(operation: str) -> Any:
    """The job, metered as ``operation`` with the cpu and io probes on every call."""
    return meterage.meter(operation, probes=("cpu", "io"), sample=1.0)(_work)


def own_counts(operation: str) -> dict[str, Any]:
    """What this process's own snapshot holds for ``operation``."""
    series = [s for s in meterage.snapshot() if s.operation == operation]
    histograms = [s.histograms for s in series]
    return {
        "pid": os.getpid(),
        "calls": sum(s.count for s in series),
        "cpu_calls": sum(h["cpu.time"].count for h in histograms if "cpu.time" in h),
        "cpu_sum": sum(h["cpu.time"].sum for h in histograms if "cpu.time" in h),
        "io_read_sum": sum(h["io.read"].sum for h in histograms if "io.read" in h),
        "io_write_sum": sum(h["io.write"].sum for h in histograms if "io.write" in h),
    }
