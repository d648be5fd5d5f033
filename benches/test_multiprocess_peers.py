"""prometheus_client's per-call costs, single-process next to multiprocess, as
pytest-benchmark tables (``--benchmark-only``).

    python -m pytest benches/test_multiprocess_peers.py --benchmark-only

The statements of ``benches/multiprocess_peers.py`` (which measures them interleaved, with
medians of per-round differences, next to the scrape and restart figures): a histogram
observation and a counter increment on a series whose labels were resolved once, and an
observation that resolves its labels per call. One round is ``LOOPS * UNROLL`` (1000)
calls, so the µs pytest-benchmark shows are ns per call. Each test also checks that the
multiprocess statement wrote to the shared directory and the single-process one did not.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("prometheus_client")

import multiprocess_peers
from prometheus_client.parser import text_string_to_metric_families

overhead = multiprocess_peers.overhead

LOOPS = 100
ROUNDS = 200

COUNTED = {"observe": "app_request_seconds_count", "inc": "app_requests_total"}
COUNTED["labels.observe"] = COUNTED["observe"]
"""The sample in a scrape that counts each operation's calls."""


@pytest.fixture(scope="module")
def prometheus() -> Iterator[tuple[multiprocess_peers.PrometheusSubject, dict[Any, Any]]]:
    """The subject, set up on a fresh directory, and its statements compiled to loops."""
    subject = multiprocess_peers.PrometheusSubject()
    directory = tempfile.mkdtemp(prefix="meterage-mp-bench-")
    subject.setup_group(directory)
    try:
        loops = {
            key: overhead.compile_loop(statement.code, statement.namespace)
            for key, statement in subject.per_call().items()
        }
        yield subject, loops
    finally:
        subject.teardown_group()
        shutil.rmtree(directory, ignore_errors=True)


def _scraped(subject: multiprocess_peers.PrometheusSubject, name: str) -> float:
    """The sum of a sample over the shared directory's scrape."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(subject.scrape().decode())
        for sample in family.samples
        if sample.name == name
    )


CASES = [
    pytest.param(
        operation,
        mode,
        id=f"{operation}-{mode}",
        marks=pytest.mark.benchmark(group=f"prometheus_client per call: {text} (1000 per round)"),
    )
    for operation, text in multiprocess_peers.OPERATIONS.items()
    for mode in multiprocess_peers.MODES
]


@pytest.mark.parametrize(("operation", "mode"), CASES)
def test_per_call(benchmark: Any, prometheus: Any, operation: str, mode: str) -> None:
    subject, loops = prometheus
    run = loops[(operation, mode)]
    before = _scraped(subject, COUNTED[operation])
    run(LOOPS)  # warm-up
    benchmark.pedantic(run, args=(LOOPS,), rounds=ROUNDS, warmup_rounds=5)
    benchmark.extra_info["calls_per_round"] = LOOPS * overhead.UNROLL
    benchmark.extra_info["mode"] = mode
    recorded = _scraped(subject, COUNTED[operation]) - before
    if mode == multiprocess_peers.MULTI:
        assert recorded >= ROUNDS * LOOPS * overhead.UNROLL
    else:
        assert recorded == 0
