"""The ``python -m meterage`` command line: the demo's counts, help and exit statuses."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest

import meterage
from meterage.cli import demo, table

DURATION = 0.5


def run_cli(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meterage", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    result = run_cli("demo", "--duration", str(DURATION), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def text_output() -> str:
    result = run_cli("demo", "--duration", str(DURATION))
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_json_has_every_operation_with_the_planned_calls(report: dict[str, Any]) -> None:
    expected = demo.plan(DURATION)
    rows = {row["operation"]: row for row in report["operations"]}
    assert list(rows) == [operation.name for operation in demo.OPERATIONS]
    for name, calls in expected.items():
        assert rows[name]["calls"] == calls, name
        assert rows[name]["driver"]["calls"] == calls, name
        assert sum(series["calls"] for series in rows[name]["series"]) == calls, name


def test_errors_match_what_the_driver_caught(report: dict[str, Any]) -> None:
    rows = {row["operation"]: row for row in report["operations"]}
    flaky = rows["demo.flaky"]
    assert flaky["errors"] == flaky["driver"]["errors"] > 0
    assert set(flaky["errors_by_type"]) <= {error.__qualname__ for error, _ in demo.ERROR_SHARES}
    assert sum(flaky["errors_by_type"].values()) == flaky["errors"]
    for name, row in rows.items():
        if name != "demo.flaky":
            assert row["errors"] == 0, name


def test_sampling_is_full_except_for_the_adaptive_operation(report: dict[str, Any]) -> None:
    for row in report["operations"]:
        if row["operation"] == demo.ADAPTIVE_OPERATION:
            assert row["sampling"] == "adaptive"
            assert 0 < row["probed"] <= row["calls"]
        else:
            assert row["probed"] == row["calls"], row["operation"]


def test_measurements_are_plausible(report: dict[str, Any]) -> None:
    rows = {row["operation"]: row for row in report["operations"]}
    for row in rows.values():
        assert 0 < row["latency_p50_s"] <= row["latency_p99_s"], row["operation"]
        if row["probed"] == row["calls"]:
            # Microseconds of probes: clear of timing noise (the timer alone may not be).
            assert row["overhead_per_call_s"] > 0, row["operation"]
    # Sleeping waits without working; the IO operation writes its payload every call.
    sleep = rows["demo.sleep"]
    assert sleep["latency_p50_s"] >= demo.SLEEP_SECONDS * 0.97
    assert sleep["per_call"]["cpu.time"] < sleep["latency_p50_s"] / 4
    file_io = rows["demo.file_io"]
    if report["probes"]["io"] is None:
        assert file_io["per_call"]["io.write"] >= demo.FILE_BYTES
        assert file_io["per_call"]["io.read"] >= demo.FILE_BYTES
    batch = [s["attributes"].get("batch.size") for s in rows["demo.batch"]["series"]]
    assert set(batch) == {"small", "large"}


def test_memory_per_call_tells_keeping_from_churning(report: dict[str, Any]) -> None:
    if report["probes"]["alloc"] is not None:
        pytest.skip(f"no alloc probe here: {report['probes']['alloc']}")
    rows = {row["operation"]: row["per_call"] for row in report["operations"]}
    render, fill = rows["demo.render"], rows["demo.cache_fill"]
    # The report's lines (2,000 strings of ~30 bytes) and the joined text, all freed.
    assert render["memory.allocated"] >= demo.REPORT_LINES * 60
    assert render["memory.retained"] < 1024
    assert render["memory.peak"] >= demo.REPORT_LINES * 60
    # Each fill keeps its records: a dict of dicts, over 100 bytes a record.
    assert fill["memory.retained"] >= demo.RECORDS_PER_FILL * 100
    assert fill["memory.allocations"] >= demo.RECORDS_PER_FILL * 2
    # Sleeping allocates nothing of its own.
    assert rows["demo.sleep"]["memory.allocated"] < 1024


def test_custom_instruments_and_overhead_are_reported(report: dict[str, Any]) -> None:
    calls = demo.plan(DURATION)["demo.batch"]
    items = [row for row in report["instruments"] if row["name"] == "demo.batch.items"]
    assert sum(row["count"] for row in items) == calls
    lookups = {
        row["attributes"]["result"]: row["value"]
        for row in report["instruments"]
        if row["name"] == "demo.cache.lookups"
    }
    assert lookups["hit"] + lookups["miss"] == sum(row["sum"] for row in items)
    assert set(report["overhead"]) == {"function", "with", "steps"}
    for cost in report["overhead"].values():
        assert cost["bare_s"] > 0
        assert cost["all_probes_s"] > cost["timer_only_s"]


def test_text_table_shows_each_operation_and_its_calls(text_output: str) -> None:
    expected = demo.plan(DURATION)
    for name, calls in expected.items():
        # The first table: operation, calls, errors, ...
        match = re.search(rf"^\s+{re.escape(name)}\s+([\d,]+)\s+([\d,]+)\s", text_output, re.M)
        assert match, name
        assert int(match.group(1).replace(",", "")) == calls, name
    assert "sample=1.0" in text_output
    assert "measured on this machine" in text_output
    assert "Custom instruments" in text_output
    # A table for each probe without one of its own, its columns from its measures.
    for probe in meterage._native.PROBES:
        if probe["name"] not in demo.OWN_SECTIONS:
            assert f"Per call, {probe['name']} probe (means):" in text_output
            for header, _ in demo.measure_columns(probe["name"]):
                assert header in text_output, header


def test_demo_without_a_gpu_says_why_in_one_line(tmp_path) -> None:
    missing = str(tmp_path / "libnvidia-ml.so.1")
    result = run_cli("demo", "--duration", "0.2", env={"METERAGE_NVML_LIBRARY": missing})
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("GPU")]
    assert line.startswith("GPU columns: none (no usable NVIDIA GPU here: ") and missing in line
    assert "GPU per call" not in result.stdout


def test_demo_with_a_gpu_shows_energy_and_memory_per_call(fake_nvml_library: str) -> None:
    power_w = 75.0  # the fake's first live GPU
    result = run_cli(
        "demo",
        "--duration",
        str(DURATION),
        "--json",
        env={"METERAGE_NVML_LIBRARY": fake_nvml_library, "FAKE_NVML_DEVICES": "1"},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["probes"]["gpu"] is None
    styles = {operation.name: operation.style for operation in demo.OPERATIONS}
    for row in report["operations"]:
        if row["sampling"] != "sample=1.0":
            continue
        # Every call is under 100 ms: a power x time estimate.
        assert row["gpu_energy_estimated_share"] == 1.0, row["operation"]
        assert row["per_call"]["gpu.memory"] == 0  # no CUDA context in the demo
        energy, low = row["gpu_energy_per_call_j"], power_w * row["wall_per_call_s"]
        if styles[row["operation"]] == "steps":
            # Coroutines and generators are charged for their own steps only, not for
            # the time they wait between steps.
            assert 0 < energy < low, row["operation"]
        else:
            # The GPU readings enclose the call (the fake answers in microseconds, but on a
            # loaded machine the thread can be preempted between a reading and the call:
            # a few ms of slack, per the mean call).
            assert low <= energy <= low + power_w * 0.005, row["operation"]
    text = demo.format_report(report)
    assert "GPU per call (counted GPUs: 0 NVIDIA Fake Live 0):" in text
    assert "GPU columns: none" not in text


def test_no_arguments_prints_help_and_exits_2() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "demo" in result.stderr and "bench" in result.stderr


@pytest.mark.parametrize("args", [("--help",), ("demo", "--help")])
def test_help_exits_0(args: tuple[str, ...]) -> None:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_bad_duration_is_a_usage_error() -> None:
    result = run_cli("demo", "--duration", "-1")
    assert result.returncode == 2
    assert "--duration" in result.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("meterage.cli.bench") is None, reason="no bench module"
)
def test_bench_gets_its_own_arguments() -> None:
    result = run_cli("bench", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_merged_quantile_matches_one_histogram_of_all_values() -> None:
    values = [0.0, 0.0] + [1.3**k * 1e-6 for k in range(200)]
    whole = meterage.histogram("test.cli.merge.whole")
    parts = meterage.histogram("test.cli.merge.parts")
    for index, value in enumerate(values):
        whole.record(value)
        parts.record(value, attributes={"half": index % 2})
    halves = [parts.snapshot({"half": 0}), parts.snapshot({"half": 1})]
    for q in (0.01, 0.25, 0.5, 0.9, 0.99):
        assert demo.merged_quantile(halves, q) == pytest.approx(
            whole.snapshot().quantile(q), rel=1e-9
        )
    assert demo.merged_quantile([], 0.5) is None


def test_human_units() -> None:
    assert table.format_seconds(42e-9) == "42.0 ns"
    assert table.format_seconds(1.234e-3) == "1.23 ms"
    assert table.format_seconds(999.96e-6) == "1.00 ms"
    assert table.format_seconds(7.0e-5, sign=True) == "+70.0 µs"
    assert table.format_seconds(float("nan")) == "n/a"
    assert table.format_bytes(0) == "0 B"
    assert table.format_bytes(64 * 1024) == "64 KiB"
    assert table.format_bytes(1.5 * 1024**2) == "1.5 MiB"
    assert table.format_amount(0.004) == "0.004"
    assert table.format_share(1.0) == "100%"
    rendered = table.render(("a", "b"), [("x", "1"), ("long", "22")])
    assert rendered.splitlines() == ["a      b", "----  --", "x      1", "long  22"]


def test_demo_serve_exposes_the_calls_on_a_prometheus_endpoint(tmp_path) -> None:
    pytest.importorskip("opentelemetry.exporter.prometheus")
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "meterage", "demo", "--duration", "0.3", "--serve"]
    server = subprocess.Popen(
        [*command, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    try:
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{port}/metrics"
                text = urllib.request.urlopen(url, timeout=2).read().decode()
            except OSError:
                time.sleep(0.2)
                continue
            if 'meterage_operation="demo.cpu_bound"' in text:
                break
            time.sleep(0.2)
        counts = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("meterage_call_duration_seconds_count")
            and 'meterage_operation="demo.cpu_bound"' in line
        ]
        assert counts and counts[0] >= 1, text[:2000]
        assert "process_cpu_time_seconds_total" in text
        # The demo shop's requests, metered by route on a real server under its own load.
        deadline = time.monotonic() + 30
        while 'http_route="/products/{id}"' not in text and time.monotonic() < deadline:
            time.sleep(0.2)
            text = urllib.request.urlopen(url, timeout=2).read().decode()
        shop = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("http_server_request_duration_seconds_count")
            and 'http_route="/products/{id}"' in line
        ]
        assert shop and shop[0] >= 1, text[-3000:]
        # SIGTERM stops it as Ctrl-C does (exit 130, mid-workload or serving): its scratch
        # directories go with it.
        server.terminate()
        assert server.wait(timeout=30) == 130
        assert list(tmp_path.iterdir()) == []
    finally:
        server.kill()
        server.wait(timeout=10)
        assert server.stdout is not None
        server.stdout.close()
