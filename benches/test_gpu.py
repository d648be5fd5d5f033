"""Per-call cost of the gpu probe, and of one reading of the device metrics
(``--benchmark-only``).

    python -m pytest benches/test_gpu.py --benchmark-only

On a machine with an NVIDIA driver this measures the real NVML; elsewhere (or with
``METERAGE_BENCH_FAKE_NVML=1``) it loads the test suite's fake NVML, whose entry points
return at once: then the numbers are meterage's own cost around NVML (the GIL released and
taken back twice per call, the device sums), and a real driver adds its own time per NVML
call on top. Each round is 1000 calls, so the µs columns read as ns per call.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import meterage
from meterage import _native

CALLS = 1000
GROUP = "gpu probe, per call"


def _use_fake(tmp_path_factory: pytest.TempPathFactory) -> str:
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from nvml_fake import build

    os.environ["METERAGE_NVML_LIBRARY"] = build(tmp_path_factory.mktemp("nvml"))
    os.environ["FAKE_NVML_DEVICES"] = "1"
    reason = _native._reload_nvml()
    assert reason is None, reason
    return "fake"


@pytest.fixture(scope="module")
def nvml(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """ "real" or "fake": which NVML the benchmarks measure."""
    saved = {key: os.environ.get(key) for key in ("METERAGE_NVML_LIBRARY", "FAKE_NVML_DEVICES")}
    real = os.environ.get("METERAGE_BENCH_FAKE_NVML") != "1" and (
        meterage.available_probes(["gpu"])["gpu"] is None
    )
    kind = "real" if real else _use_fake(tmp_path_factory)
    yield kind
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _native._reload_nvml()


def _work() -> None:
    pass


def _calls(function: Callable[[], Any]) -> Callable[[], None]:
    def thousand() -> None:
        for _ in range(CALLS):
            function()

    return thousand


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize(
    "probes",
    [None, (), ("cpu",), ("gpu",), ("cpu", "rusage", "io", "gpu")],
    ids=["bare", "timer-only", "cpu", "gpu", "all+gpu"],
)
def test_gpu_probe_per_call(benchmark: Any, nvml: str, probes: tuple[str, ...] | None) -> None:
    if probes is None:
        subject = _work
    else:
        name = f"bench.gpu.{'-'.join(probes) or 'timer'}"
        subject = meterage.meter(name, probes=probes, sample=1.0)(_work)
    benchmark.extra_info["nvml"] = nvml
    benchmark(_calls(subject))
    if probes and "gpu" in probes:
        (series,) = [s for s in meterage.snapshot() if s.operation == name]
        assert series.histograms["gpu.energy.estimated"].count > 0


@pytest.mark.benchmark(group="gpu device metrics, one reading")
def test_device_reading(benchmark: Any, nvml: str) -> None:
    benchmark.extra_info["nvml"] = nvml
    reading = benchmark(_native.gpu_metrics)
    assert reading is not None and reading["devices"]


@pytest.mark.benchmark(group="gpu probe, per call, beside a busy Python thread")
@pytest.mark.parametrize("probes", [("cpu",), ("cpu", "gpu")], ids=["cpu", "cpu+gpu"])
def test_gpu_probe_beside_a_busy_thread(benchmark: Any, nvml: str, probes: tuple[str, ...]) -> None:
    """The readings keep the GIL: a CPU-bound thread beside the metered one must not add
    a GIL hand-over (up to the 5 ms switch interval) to every probed call."""
    import threading

    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    subject = meterage.meter(f"bench.gpu.busy.{'-'.join(probes)}", probes=probes, sample=1.0)(_work)
    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        benchmark.extra_info["nvml"] = nvml
        benchmark(_calls(subject))
    finally:
        stop.set()
        spinner.join()
