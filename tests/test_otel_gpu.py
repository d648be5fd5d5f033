"""GPU metrics through the OpenTelemetry bridge, against the fake NVML library: device
metrics with their semantic-convention names and attributes, this process's share, the
per-call GPU measures, NVML errors, and attach(gpu=...)."""

from __future__ import annotations

import logging
import os
import time
import warnings

import pytest

pytest.importorskip("opentelemetry.sdk.metrics")

from nvml_fake import GPU_IS_LOST, NOT_SUPPORTED, RESERVED_BYTES
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    NumberDataPoint,
)

import meterage
import meterage.otel
from meterage.otel._gpu import GPU_METRIC_NAMES

GIB = 1 << 30


@pytest.fixture
def exported():
    """``exported(gpu=None)`` -> a reader of a fresh provider meterage is attached to."""
    made: list[MeterProvider] = []

    def make(**options) -> InMemoryMetricReader:
        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        made.append(provider)
        meterage.otel.attach(provider, process=False, spans=False, **options)
        return reader

    yield make
    for provider in made:
        meterage.otel.detach(provider)
        provider.shutdown()


def collect(reader: InMemoryMetricReader) -> dict[str, list[NumberDataPoint]]:
    data = reader.get_metrics_data()
    return {
        metric.name: list(metric.data.data_points)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


def by_gpu(points, **extra) -> dict[str, float]:
    """hw.id -> value of the points with these extra attributes."""
    return {
        p.attributes["hw.id"]: p.value
        for p in points
        if all(p.attributes.get(key) == value for key, value in extra.items())
    }


def two_scripted_gpus(fake) -> None:
    pid = os.getpid()
    for index, (name, memory_total) in enumerate([("NVIDIA Fake H100", 80), ("Fake L4", 24)]):
        fake.add_device(name, f"GPU-fake-{index}", memory_total * GIB)
        fake.add_energy(index, 123_456_789 + index)
        fake.set_power(index, 350_500 - 100_000 * index)
        fake.set_memory_used(index, (10 + index) * GIB)
        fake.set_utilization(index, 87 - index, 40, encoder=5 + index, decoder=0)
        fake.set_temperature(index, 61 + index)
    fake.set_process(0, pid, 3 * GIB)
    fake.set_process(0, pid + 1, 5 * GIB)
    now = now_us()
    fake.add_process_sample(0, pid, now - 5_000_000, sm=90)  # older than a second: ignored
    fake.add_process_sample(0, pid, now - 400_000, sm=30, encoder=2)
    fake.add_process_sample(0, pid, now - 200_000, sm=45, encoder=1)  # the newest counts
    fake.add_process_sample(0, pid + 1, now - 100_000, sm=40)
    assert fake.load() is None


def now_us() -> int:
    """NVML's sample timestamps: µs since the epoch."""
    return time.time_ns() // 1000


def test_device_metrics_carry_the_devices_values_and_attributes(fake_nvml, exported):
    two_scripted_gpus(fake_nvml)
    metrics = collect(exported())
    assert set(GPU_METRIC_NAMES) <= set(metrics)
    h100, l4 = "GPU-fake-0", "GPU-fake-1"
    assert by_gpu(metrics["hw.gpu.utilization"], **{"hw.gpu.task": "general"}) == {
        h100: 0.87,
        l4: 0.86,
    }
    assert by_gpu(metrics["hw.gpu.utilization"], **{"hw.gpu.task": "encoder"}) == {
        h100: 0.05,
        l4: 0.06,
    }
    assert by_gpu(metrics["hw.gpu.memory.usage"]) == {h100: 10 * GIB, l4: 11 * GIB}
    assert by_gpu(metrics["hw.gpu.memory.limit"]) == {h100: 80 * GIB, l4: 24 * GIB}
    assert by_gpu(metrics["hw.gpu.memory.utilization"]) == {h100: 10 / 80, l4: 11 / 24}
    assert by_gpu(metrics["hw.power"]) == {h100: 350.5, l4: 250.5}
    assert by_gpu(metrics["hw.energy"]) == {h100: 123_456.789, l4: 123_456.790}
    # The temperature belongs to each GPU's sensor, a component of its own.
    temperatures = {p.attributes["hw.parent"]: p for p in metrics["hw.temperature"]}
    assert {gpu: p.value for gpu, p in temperatures.items()} == {h100: 61, l4: 62}
    assert dict(temperatures[h100].attributes) == {
        "hw.id": f"{h100}-temperature",
        "hw.type": "temperature",
        "hw.name": "GPU 0 temperature",
        "hw.parent": h100,
        "hw.vendor": "NVIDIA",
        "hw.model": "NVIDIA Fake H100",
        "hw.driver_version": "550.54.15",
    }
    # This process: 3 GiB on the H100 (not the other process's 5), none on the L4.
    assert by_gpu(metrics["meterage.process.gpu.memory.usage"]) == {h100: 3 * GIB, l4: 0}
    process = metrics["meterage.process.gpu.utilization"]
    assert by_gpu(process, **{"hw.gpu.task": "general"}) == {h100: 0.45, l4: 0.0}
    assert by_gpu(process, **{"hw.gpu.task": "encoder"}) == {h100: 0.01, l4: 0.0}

    (point,) = [p for p in metrics["hw.power"] if p.attributes["hw.id"] == h100]
    assert dict(point.attributes) == {
        "hw.id": h100,
        "hw.type": "gpu",
        "hw.name": "GPU 0",
        "hw.vendor": "NVIDIA",
        "hw.model": "NVIDIA Fake H100",
        "hw.driver_version": "550.54.15",
    }


def test_every_reader_sees_the_same_process_utilization(fake_nvml):
    """The process's share is its newest NVML sample of the last second: no state, so no
    reader takes the samples away from another."""
    two_scripted_gpus(fake_nvml)
    readers = [InMemoryMetricReader(), InMemoryMetricReader()]
    provider = MeterProvider(metric_readers=readers)
    meterage.otel.attach(provider, process=False, spans=False)
    try:
        for _ in range(2):
            for reader in readers:
                process = collect(reader)["meterage.process.gpu.utilization"]
                assert by_gpu(process, **{"hw.gpu.task": "general"})["GPU-fake-0"] == 0.45
        fake_nvml.add_process_sample(0, os.getpid(), now_us(), sm=12)
        process = collect(readers[1])["meterage.process.gpu.utilization"]
        assert by_gpu(process, **{"hw.gpu.task": "general"})["GPU-fake-0"] == 0.12
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()


def test_memory_in_use_leaves_out_what_the_driver_reserves(fake_nvml, exported):
    two_scripted_gpus(fake_nvml)
    reader = exported()
    assert by_gpu(collect(reader)["hw.gpu.memory.usage"])["GPU-fake-0"] == 10 * GIB
    # A driver without nvmlDeviceGetMemoryInfo_v2: the v1 figure, reserved memory included.
    fake_nvml.fail("nvmlDeviceGetMemoryInfo_v2", NOT_SUPPORTED)
    used = by_gpu(collect(reader)["hw.gpu.memory.usage"])["GPU-fake-0"]
    assert used == 10 * GIB + RESERVED_BYTES


def test_device_metrics_follow_the_gpu_selection(fake_nvml, exported, monkeypatch):
    two_scripted_gpus(fake_nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-fake-1")
    fake_nvml.load()
    metrics = collect(exported())
    assert set(by_gpu(metrics["hw.power"])) == {"GPU-fake-1"}


def test_unsupported_values_are_left_out_and_failures_logged_once(fake_nvml, exported, caplog):
    two_scripted_gpus(fake_nvml)
    fake_nvml.fail("nvmlDeviceGetTemperature", NOT_SUPPORTED)
    fake_nvml.fail("nvmlDeviceGetPowerUsage", GPU_IS_LOST, device=1)
    reader = exported()
    with caplog.at_level(logging.WARNING, logger="meterage.otel"):
        first = collect(reader)
        second = collect(reader)
    for metrics in (first, second):
        assert "hw.temperature" not in metrics  # no GPU supports it: no points at all
        assert set(by_gpu(metrics["hw.power"])) == {"GPU-fake-0"}
        assert set(by_gpu(metrics["hw.energy"])) == {"GPU-fake-0", "GPU-fake-1"}
    logged = [r.getMessage() for r in caplog.records if r.name == "meterage.otel"]
    assert len(logged) == 1, logged
    assert "GPU-fake-1" in logged[0] and "power" in logged[0] and "GPU is lost" in logged[0]


def test_gpu_metrics_are_on_when_available_and_off_on_request(fake_nvml, exported):
    two_scripted_gpus(fake_nvml)
    assert "hw.power" not in collect(exported(gpu=False))
    assert "hw.power" in collect(exported())


def test_without_nvml_gpu_metrics_are_absent_and_asking_for_them_warns(
    fake_nvml, exported, monkeypatch, tmp_path
):
    monkeypatch.setenv("METERAGE_NVML_LIBRARY", str(tmp_path / "missing.so"))
    assert fake_nvml.load() is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gpu=None: quietly nothing
        assert not set(GPU_METRIC_NAMES) & set(collect(exported()))
    with pytest.warns(RuntimeWarning, match="GPU metrics are unavailable"):
        reader = exported(gpu=True)
    assert not set(GPU_METRIC_NAMES) & set(collect(reader))


def test_per_call_gpu_measures_export_with_their_source(fake_nvml, exported, unique):
    two_scripted_gpus(fake_nvml)
    meterage.configure(gpu_devices=[0])
    name = unique()

    @meterage.meter(name, probes=("gpu",), sample=1.0)
    def infer(long: bool) -> None:
        fake_nvml.add_energy(0, 7_000)
        if long:
            time.sleep(0.12)

    infer(True)
    infer(False)
    metrics = collect(exported())
    energy = [
        p for p in metrics["meterage.call.gpu.energy"] if p.attributes["meterage.operation"] == name
    ]
    by_source = {p.attributes["meterage.gpu.energy.source"]: p for p in energy}
    assert set(by_source) == {"counter", "power_estimate"}
    assert (by_source["counter"].count, by_source["counter"].sum) == (1, 7.0)
    assert by_source["power_estimate"].count == 1
    (memory,) = [
        p for p in metrics["meterage.call.gpu.memory"] if p.attributes["meterage.operation"] == name
    ]
    assert (memory.count, memory.sum) == (2, 6 * GIB)
