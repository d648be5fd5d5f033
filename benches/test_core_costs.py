"""The core's costs as pytest-benchmark tables (``--benchmark-only``).

    python -m pytest benches/test_core_costs.py --benchmark-only

The same subjects as ``benches/core_costs.py``, which measures them interleaved (medians of
per-round differences against a baseline in the same run) and prints them next to their
goals; these tables are for pytest-benchmark's JSON and comparisons. Per-operation rounds
are ``LOOPS * UNROLL`` (1000) operations, so the µs shown are ns per operation.
"""

from __future__ import annotations

from typing import Any

import core_costs
import pytest

import meterage
from meterage.cli import overhead

LOOPS = 100

SUBJECTS = {subject.key: subject for subject in core_costs.per_operation_subjects()}


@pytest.mark.benchmark(group="core: per operation (1000 per round)")
@pytest.mark.parametrize("key", list(SUBJECTS))
def test_per_operation(benchmark: Any, key: str) -> None:
    subject = SUBJECTS[key]
    subject.run(LOOPS)  # warm-up
    benchmark.pedantic(subject.run, args=(LOOPS,), rounds=200, warmup_rounds=5)
    benchmark.extra_info["operations_per_round"] = LOOPS * overhead.UNROLL
    benchmark.extra_info["subject"] = subject.label


@pytest.fixture
def unlimited() -> Any:
    meterage.reset()
    meterage.configure(cardinality_limit=meterage.MAX_CARDINALITY_LIMIT)
    yield
    meterage.reset()
    meterage.configure(cardinality_limit=2000)


@pytest.mark.benchmark(group="core: 1000 new series")
@pytest.mark.parametrize("size", [1_000, 10_000, 100_000])
def test_new_series(benchmark: Any, unlimited: None, size: int) -> None:
    histogram = meterage.histogram(f"bench.core.new.{size}")
    core_costs._series_batch(histogram, 0, size)
    first = iter(range(size, size + 1_000 * 1_000, 1_000))

    def batch() -> None:
        core_costs._series_batch(histogram, next(first), 1_000)

    benchmark.pedantic(batch, rounds=20, warmup_rounds=1)
    assert len([s for s in meterage.snapshot() if s.name == histogram.name]) == size + 21_000


@pytest.mark.benchmark(group="core: snapshot of 10,000 series")
@pytest.mark.parametrize("probes", [(), overhead.ALL_PROBES], ids=["timer-only", "all-probes"])
def test_snapshot(benchmark: Any, unlimited: None, probes: tuple[str, ...]) -> None:
    block = meterage.meter(f"bench.core.snapshot.{len(probes)}", probes=probes, sample=1.0)
    for index in range(10_000):
        with block as call:
            call.set_attribute("id", index)
    series = benchmark(meterage.snapshot)
    assert len(series) == 10_000


@pytest.mark.benchmark(group="core: fork to a child's first call")
@pytest.mark.parametrize("count", [0, 20_000])
def test_fork(benchmark: Any, unlimited: None, count: int) -> None:
    block = meterage.meter("bench.core.fork.many", probes=overhead.ALL_PROBES, sample=1.0)
    for index in range(count):
        with block as call:
            call.set_attribute("id", index)
    probe = meterage.meter("bench.core.fork.first", probes=())

    def child() -> None:
        meterage.snapshot()
        with probe:
            pass

    benchmark.pedantic(lambda: core_costs._fork_once(child), rounds=10, warmup_rounds=1)
