"""Requests, as pytest-benchmark tables (``--benchmark-only``).

    python -m pytest benches/test_requests.py --benchmark-only

Every subject of ``benches/requests_overhead.py`` (each application bare and with each
instrumentation that is installed) timed one after another, not interleaved: one round is
``REQUESTS`` requests, so the µs pytest-benchmark shows, divided by 100, are µs per request.
The ratios and the goals come from the script's interleaved rounds. Each test also checks
that the application answered and, for meterage, that every request was recorded.

``test_servers_quick`` runs ``requests_servers.py --quick --json`` (uvicorn and gunicorn,
every variant that can run here; ~20 s) as one benchmark round and checks what came back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests_overhead

import meterage

REQUESTS = 100
ROUNDS = 50

CASES = [
    pytest.param(app, variant, id=f"{app}-{variant}")
    for app in requests_overhead.APPS
    for variant in requests_overhead.VARIANTS
    if not (variant in ("prometheus", "fastapi-native") and app != "fastapi")
]


def _requests_recorded() -> int:
    return sum(
        series.count for series in meterage.snapshot() if series.operation == "http.server.request"
    )


@pytest.mark.parametrize(("app", "variant"), CASES)
def test_request(benchmark: Any, app: str, variant: str) -> None:
    why = requests_overhead.available(app, variant)
    if why is not None:
        pytest.skip(why)
    built = requests_overhead.build_app(app, variant)
    requests_overhead.check_answer(app, built)
    run = requests_overhead.runner(app, built)
    try:
        run(REQUESTS)  # warm-up
        before = _requests_recorded()
        benchmark.pedantic(run, args=(REQUESTS,), rounds=ROUNDS, iterations=1)
    finally:
        run.close()
    recorded = _requests_recorded() - before
    if variant in requests_overhead.METERAGE_VARIANTS:
        assert recorded == REQUESTS * ROUNDS
    else:
        assert recorded == 0


def test_servers_quick(benchmark: Any) -> None:
    script = Path(__file__).with_name("requests_servers.py")

    def run() -> dict[str, object]:
        done = subprocess.run(
            [sys.executable, str(script), "--quick", "--restarts", "2", "--json"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    found = benchmark.pedantic(run, rounds=1, iterations=1)
    figures = found["figures"]
    assert set(figures) == {"uvicorn", "gunicorn"}
    for server, rows in figures.items():
        assert {"bare", "default"} <= set(rows), server
        for variant, row in rows.items():
            assert row["throughput"] > 0, (server, variant)
            assert 0 < row["p50_us"] <= row["p99_us"], (server, variant)
            if variant != "bare":
                assert "throughput_vs_bare" in row
        # --quick's two rounds, each on a fresh set of servers (--restarts 2).
        for variant, rounds in found["rounds"][server].items():
            assert len({r["server_pid"] for r in rounds}) == len(rounds) == 2, (server, variant)
