"""Per-call cost of every subject, as pytest-benchmark tables.

    python -m pytest benches --benchmark-only

One round is ``CALLS_PER_ROUND`` (1000) calls, so the times pytest-benchmark shows in µs
are ns per call (ms: µs per call). Compare rows within a group; the ratios the goals are
about are measured interleaved by ``python -m meterage bench`` and
``benches/check_overhead.py``, which are less exposed to a machine's speed changing
between one test and the next.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from meterage.cli import overhead

LOOPS = 100
CALLS_PER_ROUND = LOOPS * overhead.UNROLL
TARGET_SECONDS = 0.5
"""Time each benchmark spends in its rounds (bounded by MIN_ROUNDS and MAX_ROUNDS)."""
MIN_ROUNDS, MAX_ROUNDS = 20, 1000

# (test id prefix, pytest-benchmark group, subject keys)
GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "timer",
        "trivial function: timer",
        (overhead.BARE, overhead.FLOOR, overhead.TIMER, "meterage.timer.with"),
    ),
    (
        "probes",
        "trivial function: probes on every call",
        (overhead.FLOOR_PROBES, overhead.FULL, "floor.cpu", "meterage.cpu"),
    ),
    (
        "peers",
        "peers vs meterage timer-only",
        (
            overhead.BARE,
            overhead.TIMER,
            "prometheus.decorator",
            "prometheus.with",
            "prometheus.labels",
            "prometheus.child",
            "otel.record",
        ),
    ),
    (
        "10us",
        "~10 us function: meterage defaults",
        (overhead.BARE_10US, overhead.DEFAULT_10US),
    ),
)

CASES = [
    pytest.param(key, id=f"{prefix}-{key}", marks=pytest.mark.benchmark(group=group))
    for prefix, group, keys in GROUPS
    for key in keys
]


@pytest.mark.parametrize("key", CASES)
def test_per_call(
    benchmark: Any,
    subjects: dict[str, overhead.Subject],
    recorded_calls: Callable[[overhead.Subject], int | None],
    key: str,
) -> None:
    """Times ``CALLS_PER_ROUND`` calls of one subject per round."""
    subject = subjects.get(key)
    if subject is None:
        pytest.skip(f"{key}: its library is not installed")
    subject.run(LOOPS)  # warm-up, and one round's length to size the run
    started = time.perf_counter()
    subject.run(LOOPS)
    per_round = time.perf_counter() - started
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_SECONDS / per_round)))
    before = recorded_calls(subject)

    benchmark.pedantic(subject.run, args=(LOOPS,), rounds=rounds, warmup_rounds=2)

    benchmark.extra_info["calls_per_round"] = CALLS_PER_ROUND
    benchmark.extra_info["subject"] = subject.label
    after = recorded_calls(subject)
    if before is not None and after is not None:
        # The wrapper under test really ran (and recorded) every call.
        assert after - before >= (rounds + 2) * CALLS_PER_ROUND
