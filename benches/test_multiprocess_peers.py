"""Multiprocess mode, as pytest-benchmark tables (``--benchmark-only``).

    python -m pytest benches/test_multiprocess_peers.py --benchmark-only

prometheus_client's per-call statements from ``benches/multiprocess_peers.py`` (which
measures them interleaved, with medians of per-round differences, next to the scrape and
restart figures): a histogram observation and a counter increment on a series whose labels
were resolved once, an observation that resolves its labels per call, and a function
decorated with ``.time()``, single-process and multiprocess. One round is
``LOOPS * UNROLL`` (1000) calls, so the µs pytest-benchmark shows are ns per call. Each test
also checks that the multiprocess statement wrote to the shared directory and the
single-process one did not. meterage's multiprocess mode is a process's, so its per-call
figures come only from the script (paired processes).

``test_quick_run`` runs ``multiprocess_peers.py --quick --json`` (every subject that can run
here, each group in its own processes; ~20 s) as one benchmark round and checks what every
scrape read back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prometheus_client")

import multiprocess_peers
from prometheus_client.parser import text_string_to_metric_families

overhead = multiprocess_peers.overhead

LOOPS = 100
ROUNDS = 200

COUNTED = {
    "observe": "app_request_seconds_count",
    "inc": "app_requests_total",
    "labels.observe": "app_request_seconds_count",
    "timer": "app_request_seconds_count",
}
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
            for key, statement in subject.per_call_statements().items()
        }
        yield subject, loops
    finally:
        subject.teardown_group()
        shutil.rmtree(directory, ignore_errors=True)


def _scraped(subject: multiprocess_peers.PrometheusSubject, name: str) -> float:
    """The sum of a sample over the shared directory's scrape."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(subject.scrape().text.decode())
        for sample in family.samples
        if sample.name == name
    )


CASES = [
    pytest.param(
        operation,
        mode,
        id=f"{operation}-{mode}",
        marks=pytest.mark.benchmark(
            group=(
                f"prometheus_client per call: {multiprocess_peers.OPERATIONS[operation].text}"
                " (1000 per round)"
            )
        ),
    )
    for operation in multiprocess_peers.PrometheusSubject.idioms
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


@pytest.mark.timeout(300)
@pytest.mark.benchmark(group="multiprocess: the whole --quick run")
def test_quick_run(benchmark: Any) -> None:
    script = Path(multiprocess_peers.__file__).resolve()

    def quick() -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(script), "--quick", "--json"]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    done = benchmark.pedantic(quick, rounds=1, iterations=1)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout)
    plan = multiprocess_peers.QUICK
    assert results["plan"]["quick"]
    assert multiprocess_peers.PrometheusSubject.name in results["subjects"]
    if multiprocess_peers.MeterageSubject.name not in results["subjects"]:
        assert any(line.startswith("meterage:") for line in results["not_measured"])
    for name, found in results["subjects"].items():
        for operation, figures in found["per_call"].items():
            if operation in multiprocess_peers.OPERATIONS:
                assert figures["single_ns"] > 0 and figures["multi_ns"] > 0, (name, operation)
        processes = found["processes"]
        for key in ("workers_alive", "workers_exited", "restarts_one", "restarts_no_hook"):
            state = processes[key]
            read, expected = state["read_back"], state["expected"]
            assert read["series"] == plan.series, (name, key, read)
            assert read["observations"] == expected["observations"], (name, key, read)
            assert state["footprint"]["files"] >= 1, (name, key)
            assert all(seconds > 0 for seconds in state["scrape_s"].values()), (name, key)
        if name == multiprocess_peers.PrometheusSubject.name:
            # Its livesum gauge counts dead processes until mark_process_dead runs.
            assert processes["restarts_no_hook"]["read_back"]["live_workers"] == (
                plan.workers + plan.restarts
            )
            assert processes["restarts_hook"]["read_back"]["live_workers"] == plan.workers
