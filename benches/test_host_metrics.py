"""Collection cost of the host metrics (``system.*``, ``container.*``), next to psutil.

    python -m pytest benches/test_host_metrics.py --benchmark-only

These run at collection time (seconds apart), never per call: the numbers say what one
scrape or export pays for host metrics. Both variants make one reading per collection in
the layout of ``_native.host_metrics()`` and feed the very same instruments and callbacks
with it, so the collections differ only in where the values come from. Each psutil test
prints its median over meterage's (run the meterage test of its group first, as the file
orders them).
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.metrics import Meter

# The process metrics' benchmark has the collector helpers (pytest puts benches/ on the path).
from test_process_metrics import _collector, _metric_names

from meterage import _native
from meterage.otel import _host

READING = "one reading of the host"
COLLECTION = "one SDK collection of the host metrics"
VIRTUAL_DISKS = ("loop", "ram", "zram")

# Group -> meterage's median, seconds (filled by the meterage tests).
_meterage_medians: dict[str, float] = {}


def _median(benchmark: Any) -> float | None:
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median


def _record_meterage(benchmark: Any, group: str) -> None:
    median = _median(benchmark)
    if median is not None:
        _meterage_medians[group] = median


def _report_ratio(benchmark: Any, group: str, request: pytest.FixtureRequest) -> None:
    """Puts psutil's median over meterage's in the benchmark's extra info and prints it."""
    psutil_median, meterage_median = _median(benchmark), _meterage_medians.get(group)
    if psutil_median is None or meterage_median is None:
        return
    ratio = psutil_median / meterage_median
    benchmark.extra_info["psutil / meterage"] = round(ratio, 2)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"\n{group}: meterage {meterage_median * 1e6:.0f} µs, psutil "
                f"{psutil_median * 1e6:.0f} µs (psutil / meterage = {ratio:.1f})"
            )


# ---- meterage ------------------------------------------------------------------------------------


@pytest.mark.benchmark(group=READING)
def test_native_host_metrics(benchmark: Any) -> None:
    reading = benchmark(_native.host_metrics)
    _record_meterage(benchmark, READING)
    assert reading["cpu.time"] is not None


@pytest.mark.benchmark(group=READING)
def test_psutil_host_reading(benchmark: Any, request: pytest.FixtureRequest) -> None:
    psutil = _psutil()
    reading = benchmark(_psutil_reading, psutil)
    _report_ratio(benchmark, READING, request)
    assert reading["cpu.time"] is not None


@pytest.mark.benchmark(group=COLLECTION)
def test_meterage_collection(benchmark: Any) -> None:
    for reader in _collector(_host.register_host_metrics):
        benchmark(reader.get_metrics_data)
        _record_meterage(benchmark, COLLECTION)
        assert "system.cpu.time" in _metric_names(reader)


@pytest.mark.benchmark(group=COLLECTION)
def test_psutil_collection(benchmark: Any, request: pytest.FixtureRequest) -> None:
    psutil = _psutil()

    def register(meter: Meter) -> None:
        _host.register_readings(meter, _host._HostReadings(lambda: _psutil_reading(psutil)))

    for reader in _collector(register):
        benchmark(reader.get_metrics_data)
        _report_ratio(benchmark, COLLECTION, request)
        assert "system.cpu.time" in _metric_names(reader)


# ---- psutil, the usual way to get the same values -----------------------------------------------


def _psutil() -> Any:
    return pytest.importorskip("psutil")


def _psutil_reading(psutil: Any) -> dict[str, Any]:
    """What ``_native.host_metrics()`` returns, from psutil (no cgroup values: psutil has
    none)."""
    cpu = psutil.cpu_times()
    memory = psutil.virtual_memory()
    disks = [
        {
            "device": device,
            "read.bytes": counters.read_bytes,
            "write.bytes": counters.write_bytes,
            "read.operations": counters.read_count,
            "write.operations": counters.write_count,
        }
        for device, counters in psutil.disk_io_counters(perdisk=True).items()
        if not device.startswith(VIRTUAL_DISKS) and (counters.read_count or counters.write_count)
    ]
    network = [
        {
            "interface": interface,
            "receive.bytes": counters.bytes_recv,
            "transmit.bytes": counters.bytes_sent,
            "receive.packets": counters.packets_recv,
            "transmit.packets": counters.packets_sent,
            "receive.errors": counters.errin,
            "transmit.errors": counters.errout,
        }
        for interface, counters in psutil.net_io_counters(pernic=True).items()
    ]
    filesystems = []
    for partition in psutil.disk_partitions():
        usage = psutil.disk_usage(partition.mountpoint)
        filesystems.append(
            {
                "device": partition.device,
                "type": partition.fstype,
                "mountpoint": partition.mountpoint,
                "used": usage.used,
                "free": usage.free,
                "reserved": usage.total - usage.used - usage.free,
            }
        )
    return {
        "cpu.time": {
            "user": cpu.user,
            "nice": cpu.nice,
            "system": cpu.system,
            "idle": cpu.idle,
            "iowait": cpu.iowait,
            "interrupt": cpu.irq + cpu.softirq,
            "steal": cpu.steal,
        },
        # psutil's cached is Cached + SReclaimable and its used what remains, as here.
        "memory": {
            "total": memory.total,
            "used": memory.used,
            "free": memory.free,
            "buffers": memory.buffers,
            "cached": memory.cached,
        },
        "disks": disks,
        "network": network,
        "filesystems": filesystems,
        "container": dict.fromkeys(("cpu.limit", "cpu.time", "memory.usage", "memory.limit")),
    }
