"""Collection cost of the ``process.*`` metrics, next to psutil (when installed).

    python -m pytest benches/test_process_metrics.py --benchmark-only

These run at collection time (seconds apart), never per call: the numbers say what one
scrape or export pays for process metrics. Each collection reads the process once, shared
by its instruments, in both the meterage and the psutil variants.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from meterage import _native
from meterage.otel import _process

READING = "one reading of the process"
COLLECTION = "one SDK collection of the process metrics"


def _collector(register: Callable[[Meter], None]) -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    register(provider.get_meter("meterage"))
    yield reader
    provider.shutdown()


def _metric_names(reader: InMemoryMetricReader) -> set[str]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name
        for resource_metrics in data.resource_metrics
        for scope in resource_metrics.scope_metrics
        for metric in scope.metrics
    }


# ---- meterage ------------------------------------------------------------------------------------


@pytest.mark.benchmark(group=READING)
def test_native_process_metrics(benchmark: Any) -> None:
    reading = benchmark(_native.process_metrics)
    assert reading["thread.count"] is not None


@pytest.mark.benchmark(group=COLLECTION)
def test_meterage_collection(benchmark: Any) -> None:
    for reader in _collector(_process.register_process_metrics):
        benchmark(reader.get_metrics_data)
        assert "process.cpu.time" in _metric_names(reader)


# ---- psutil, the usual way to get the same values -----------------------------------------------


def _psutil() -> Any:
    return pytest.importorskip("psutil")


def _psutil_reading(process: Any, psutil: Any) -> dict[str, Any]:
    """The values ``_native.process_metrics()`` returns, from psutil (one oneshot block)."""
    with process.oneshot():
        cpu = process.cpu_times()
        memory = process.memory_info()
        switches = process.num_ctx_switches()
        reading = {
            "cpu.time.user": cpu.user,
            "cpu.time.system": cpu.system,
            "memory.usage": memory.rss,
            "memory.virtual": memory.vms,
            "context_switches.voluntary": switches.voluntary,
            "context_switches.involuntary": switches.involuntary,
            "thread.count": process.num_threads(),
            "open_file_descriptor.count": process.num_fds(),
        }
        try:
            io = process.io_counters()
            reading["disk.io.read"], reading["disk.io.write"] = io.read_bytes, io.write_bytes
        except (AttributeError, psutil.AccessDenied):
            pass
        faults = getattr(process, "page_faults", None)  # psutil >= 7.2
        if faults is not None:
            minor, major = faults()[:2]
            reading["paging.faults.minor"], reading["paging.faults.major"] = minor, major
    network = psutil.net_io_counters(pernic=True)
    reading["network.io.receive"] = sum(c.bytes_recv for n, c in network.items() if n != "lo")
    reading["network.io.transmit"] = sum(c.bytes_sent for n, c in network.items() if n != "lo")
    return reading


@pytest.mark.benchmark(group=READING)
def test_psutil_process_reading(benchmark: Any) -> None:
    psutil = _psutil()
    process = psutil.Process(os.getpid())
    reading = benchmark(_psutil_reading, process, psutil)
    assert reading["thread.count"] >= 1


def _register_psutil(meter: Meter) -> None:
    """The same instruments (utilization aside) fed by psutil, with one psutil reading per
    collection too: the first instrument's callback reads, the others reuse its reading."""
    psutil = _psutil()
    process = psutil.Process(os.getpid())
    shared: dict[str, Any] = {}

    def observe(pairs: Iterable[tuple[str, str | None, str | None]], first: bool) -> Any:
        def callback(options: CallbackOptions) -> list[Observation]:
            if first:
                shared.clear()
                shared.update(_psutil_reading(process, psutil))
            return [
                Observation(shared[key], {attribute: value} if attribute else None)
                for key, attribute, value in pairs
                if shared.get(key) is not None
            ]

        return callback

    kinds = {
        "counter": meter.create_observable_counter,
        "updown": meter.create_observable_up_down_counter,
        "gauge": meter.create_observable_gauge,
    }
    for index, (name, kind, unit, _description, attribute, sources) in enumerate(_process._METRICS):
        if name == "process.uptime":
            continue  # psutil has the start time only
        pairs = [(key, attribute, value) for key, value in sources]
        kinds[kind](name, callbacks=[observe(pairs, first=index == 0)], unit=unit)


@pytest.mark.benchmark(group=COLLECTION)
def test_psutil_collection(benchmark: Any) -> None:
    _psutil()
    for reader in _collector(_register_psutil):
        benchmark(reader.get_metrics_data)
        assert "process.cpu.time" in _metric_names(reader)
