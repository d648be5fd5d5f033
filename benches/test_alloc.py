"""The ``alloc`` probe in pytest-benchmark tables (``--benchmark-only``).

    python -m pytest benches/test_alloc.py --benchmark-only

In one process, so only what can be compared there: a probed call with and without
``alloc``, and an allocation loop inside a probed call with and without it. The
per-allocation cost of installed hooks against no hooks and tracemalloc needs a process per
variant: ``python benches/alloc_costs.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

import meterage


def empty() -> None:
    pass


def allocating() -> None:
    for i in range(1000, 1100):
        x = [i]  # noqa: F841


PROBES = {"cpu": ("cpu",), "cpu+alloc": ("cpu", "alloc")}


@pytest.mark.benchmark(group="alloc: an empty probed call")
@pytest.mark.parametrize("probes", list(PROBES))
def test_probed_empty_call(benchmark: Any, probes: str) -> None:
    metered = meterage.meter(f"bench.alloc.empty.{probes}", probes=PROBES[probes], sample=1.0)(
        empty
    )
    benchmark(metered)


@pytest.mark.benchmark(group="alloc: a probed call making 200 allocations")
@pytest.mark.parametrize("probes", list(PROBES))
def test_probed_allocating_call(benchmark: Any, probes: str) -> None:
    metered = meterage.meter(f"bench.alloc.allocating.{probes}", probes=PROBES[probes], sample=1.0)(
        allocating
    )
    benchmark(metered)
