"""The gpu probe against the fake NVML library: per-call energy and memory, device
selection, NVML errors, the no-library case, and meters that never touch NVML."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
from nvml_fake import DRIVER_NOT_LOADED, GPU_IS_LOST, NO_PERMISSION, NOT_SUPPORTED

import meterage

GIB = 1 << 30
#: A call at least this long gets the energy counter's difference (gpu.ENERGY_COUNTER_MIN).
LONG_CALL_S = 0.12


def one_gpu(fake, *, power_mw: int = 250_000) -> None:
    fake.add_device("NVIDIA Fake H100", "GPU-fake-0000", 80 * GIB)
    fake.add_energy(0, 1_000_000)
    fake.set_power(0, power_mw)
    assert fake.load() is None


def two_gpus(fake) -> None:
    for index in range(2):
        fake.add_device("NVIDIA Fake A100", f"GPU-fake-{index}{index}{index}", 40 * GIB)
        fake.set_power(index, 100_000)
    assert fake.load() is None


def measures(operation: str) -> dict[str, meterage.HistogramSnapshot]:
    (series,) = [s for s in meterage.snapshot() if s.operation == operation]
    return series.histograms


# ---- availability ------------------------------------------------------------------------------


def test_a_missing_library_is_a_reason_and_one_warning(fake_nvml, monkeypatch, unique):
    missing = "/nonexistent/libnvidia-ml.so.1"
    monkeypatch.setenv("METERAGE_NVML_LIBRARY", missing)
    reason = fake_nvml.load()
    assert reason is not None and missing in reason and "could not be loaded" in reason
    assert meterage.available_probes(["gpu"]) == {"gpu": reason}
    assert meterage.gpu_info()["reason"] == reason

    name = unique()
    with pytest.warns(RuntimeWarning, match="probe 'gpu' is unavailable") as caught:
        work = meterage.meter(name, probes=("cpu", "gpu"), sample=1.0)(lambda: 42)
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second meter does not warn again
        meterage.meter(unique(), probes=("gpu",))
    assert work() == 42
    found = measures(name)
    assert set(found) == {"duration", "cpu.time"}  # the other probes work
    assert found["cpu.time"].count == 1


def test_the_fake_libraries_errors_explain_themselves(fake_nvml):
    fake_nvml.fail("nvmlInit_v2", DRIVER_NOT_LOADED)
    reason = fake_nvml.load()
    assert "did not initialise" in reason and "Driver Not Loaded" in reason, reason
    fake_nvml.fail("nvmlInit_v2", 0)
    assert "found no GPUs" in fake_nvml.load()
    fake_nvml.add_device("NVIDIA Fake", "GPU-fake-lost", GIB)
    fake_nvml.fail("nvmlDeviceGetHandleByIndex_v2", GPU_IS_LOST, device=0)
    reason = fake_nvml.load()
    assert "could not open any GPU" in reason and "GPU is lost" in reason, reason


def test_the_wheel_works_without_nvml(tmp_path):
    """A fresh interpreter with no NVML library at all: meterage imports, reports why, and
    meters with the gpu probe record everything else."""
    code = textwrap.dedent(
        """
        import warnings, meterage
        warnings.simplefilter("ignore")
        reason = meterage.available_probes()["gpu"]
        work = meterage.meter("nogpu", probes=("io", "gpu"), sample=1.0)(lambda: 7)
        assert work() == 7
        (s,) = meterage.snapshot()
        print(reason is not None, sorted(s.histograms))
        """
    )
    env = {**os.environ, "METERAGE_NVML_LIBRARY": str(tmp_path / "none.so")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.split(maxsplit=1) == [
        "True",
        "['disk.io.read', 'disk.io.write', 'duration', 'io.read', 'io.write']\n",
    ]


def test_meters_without_the_gpu_probe_never_load_nvml(fake_nvml_library):
    """A fresh process whose meters do not ask for the GPU: NVML is never initialised
    (the fake counts its nvmlInit calls)."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import meterage
        from nvml_fake import FakeNvml
        work = meterage.meter("no.gpu", probes=("cpu", "rusage", "io"), sample=1.0)(len)
        work("abc")
        with meterage.meter("no.gpu.block"):
            pass
        meterage.snapshot()
        before = FakeNvml({fake_nvml_library!r}).calls("nvmlInit_v2")
        meterage.available_probes(["gpu"])  # asking about the GPU loads it
        print(before, FakeNvml({fake_nvml_library!r}).calls("nvmlInit_v2"))
        """
    )
    env = {**os.environ, "METERAGE_NVML_LIBRARY": fake_nvml_library, "FAKE_NVML_DEVICES": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["0", "1"]


def test_meters_without_the_gpu_probe_never_call_nvml(fake_nvml, unique):
    one_gpu(fake_nvml)
    before = fake_nvml.calls("nvmlDeviceGetTotalEnergyConsumption")
    work = meterage.meter(unique(), probes=("cpu", "rusage", "io"), sample=1.0)(lambda: None)
    for _ in range(50):
        work()
    with meterage.meter(unique(), sample=1.0):
        pass
    assert fake_nvml.calls("nvmlDeviceGetTotalEnergyConsumption") == before


# ---- per-call energy ---------------------------------------------------------------------------


def test_a_long_call_gets_the_energy_counters_difference(fake_nvml, unique):
    one_gpu(fake_nvml)
    name = unique()

    @meterage.meter(name, probes=("gpu",), sample=1.0)
    def infer() -> str:
        fake_nvml.add_energy(0, 5_250)  # the device used 5.25 J during the call
        time.sleep(LONG_CALL_S)
        return "done"

    assert infer() == "done"
    found = measures(name)
    assert (found["gpu.energy"].count, found["gpu.energy"].sum) == (1, 5.25)
    assert found["gpu.energy.estimated"].count == 0
    assert found["gpu.energy"].unit == "J"


def test_a_short_call_gets_a_power_times_time_estimate(fake_nvml, unique):
    one_gpu(fake_nvml, power_mw=250_000)
    name = unique()

    @meterage.meter(name, probes=("gpu",), sample=1.0)
    def infer() -> None:
        fake_nvml.add_energy(0, 40_000)  # a counter jump within a short call is not used

    started = time.perf_counter()
    infer()
    outside = time.perf_counter() - started
    found = measures(name)
    assert found["gpu.energy"].count == 0
    estimate = found["gpu.energy.estimated"]
    assert estimate.count == 1
    # 250 W times the time between the two readings, which enclose the call's wall time
    # and lie inside the time measured around it.
    seconds = estimate.sum / 250.0
    assert found["duration"].sum <= seconds <= outside


def test_without_an_energy_counter_every_call_is_estimated(fake_nvml, unique):
    one_gpu(fake_nvml, power_mw=100_000)
    fake_nvml.fail("nvmlDeviceGetTotalEnergyConsumption", NOT_SUPPORTED)  # pre-Volta
    name = unique()
    work = meterage.meter(name, probes=("gpu",), sample=1.0)(lambda: time.sleep(LONG_CALL_S))
    work()
    found = measures(name)
    assert found["gpu.energy"].count == 0
    assert found["gpu.energy.estimated"].count == 1
    assert found["gpu.energy.estimated"].sum >= 100.0 * LONG_CALL_S


def test_energy_and_memory_sum_over_the_counted_gpus(fake_nvml, unique, monkeypatch):
    two_gpus(fake_nvml)
    pid = os.getpid()
    fake_nvml.set_process(0, pid, 3 * GIB)
    fake_nvml.set_process(1, pid, 1 * GIB)
    fake_nvml.set_process(1, pid + 1, 7 * GIB)  # another process on the same GPU

    def run(label: str) -> dict[str, meterage.HistogramSnapshot]:
        name = unique(label)

        @meterage.meter(name, probes=("gpu",), sample=1.0)
        def train() -> None:
            fake_nvml.add_energy(0, 2_000)
            fake_nvml.add_energy(1, 500)
            time.sleep(LONG_CALL_S)

        train()
        return measures(name)

    both = run("all")
    assert both["gpu.energy"].sum == 2.5
    assert both["gpu.memory"].sum == 4 * GIB

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    fake_nvml.load()
    assert [d["counted"] for d in meterage.gpu_info()["devices"]] == [False, True]
    second = run("visible")
    assert (second["gpu.energy"].sum, second["gpu.memory"].sum) == (0.5, 1 * GIB)

    meterage.configure(gpu_devices=["GPU-fake-000"])  # explicit beats the variable
    first = run("explicit")
    assert (first["gpu.energy"].sum, first["gpu.memory"].sum) == (2.0, 3 * GIB)
    meterage.configure(gpu_devices="auto")
    assert [d["counted"] for d in meterage.gpu_info()["devices"]] == [False, True]


def test_gpu_memory_is_the_level_at_the_end_of_each_step(fake_nvml, unique):
    one_gpu(fake_nvml)
    pid = os.getpid()
    name = unique()

    @meterage.meter(name, probes=("gpu",), sample=1.0)
    async def generate() -> None:
        fake_nvml.set_process(0, pid, 100)
        await asyncio.sleep(0)
        fake_nvml.set_process(0, pid, 300)

    asyncio.run(generate())
    found = measures(name)
    assert (found["gpu.memory"].count, found["gpu.memory"].sum) == (1, 300)  # not 400


# ---- NVML errors -------------------------------------------------------------------------------


def test_a_lost_gpu_records_nothing_of_the_gpu_but_the_call(fake_nvml, unique):
    one_gpu(fake_nvml)
    fake_nvml.set_process(0, os.getpid(), GIB)
    for function in (
        "nvmlDeviceGetTotalEnergyConsumption",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetComputeRunningProcesses_v3",
    ):
        fake_nvml.fail(function, GPU_IS_LOST)
    name = unique()
    work = meterage.meter(name, probes=("gpu", "cpu"), sample=1.0)(lambda: "still fine")
    assert work() == "still fine"
    found = measures(name)
    assert found["duration"].count == found["cpu.time"].count == 1
    for measure in ("gpu.energy", "gpu.energy.estimated", "gpu.memory"):
        assert found[measure].count == 0, measure


def test_memory_is_left_out_when_the_driver_will_not_say(fake_nvml, unique):
    one_gpu(fake_nvml)
    fake_nvml.set_process(0, os.getpid(), None)  # NVML_VALUE_NOT_AVAILABLE
    name = unique()
    meterage.meter(name, probes=("gpu",), sample=1.0)(lambda: None)()
    assert measures(name)["gpu.memory"].count == 0
    assert measures(name)["gpu.energy.estimated"].count == 1

    fake_nvml.set_process(0, os.getpid(), GIB)
    fake_nvml.fail("nvmlDeviceGetComputeRunningProcesses_v3", NO_PERMISSION)
    other = unique()
    meterage.meter(other, probes=("gpu",), sample=1.0)(lambda: None)()
    assert measures(other)["gpu.memory"].count == 0


def test_a_process_without_memory_on_the_gpu_uses_zero(fake_nvml, unique):
    one_gpu(fake_nvml)
    fake_nvml.set_process(0, os.getpid() + 1, GIB)  # someone else's
    name = unique()
    meterage.meter(name, probes=("gpu",), sample=1.0)(lambda: None)()
    memory = measures(name)["gpu.memory"]
    assert (memory.count, memory.sum) == (1, 0)


# ---- selection and bad input -------------------------------------------------------------------


def test_bad_gpu_selections_say_what_is_allowed(fake_nvml):
    two_gpus(fake_nvml)
    with pytest.raises(ValueError, match=r"names no GPU; the GPUs here are 0 \(GPU-fake-000\)"):
        meterage.configure(gpu_devices=[5])
    with pytest.raises(ValueError, match="more than one GPU"):
        meterage.configure(gpu_devices=["GPU-fake"])
    with pytest.raises(ValueError, match="empty"):
        meterage.configure(gpu_devices=[])
    with pytest.raises(ValueError, match='starting with "GPU-"'):
        meterage.configure(gpu_devices=["fake-000"])
    with pytest.raises(TypeError, match='or "auto"'):
        meterage.configure(gpu_devices="GPU-fake-000")
    with pytest.raises(TypeError, match="not bool"):
        meterage.configure(gpu_devices=[True])
    with pytest.raises(TypeError, match="not float"):
        meterage.configure(gpu_devices=[0.5])
    for index in (-1, 2**32, 2**70):
        with pytest.raises(ValueError, match=f"GPU index {index} is out of range"):
            meterage.configure(gpu_devices=[index])
    # Nothing changed by the failures: both GPUs still count.
    assert [d["counted"] for d in meterage.gpu_info()["devices"]] == [True, True]


def test_cuda_visible_devices_follows_cudas_rules(fake_nvml, monkeypatch):
    two_gpus(fake_nvml)
    for value, counted in [
        ("1,0", [True, True]),
        ("GPU-fake-111", [False, True]),
        ("0,7,1", [True, False]),  # the list stops at the first GPU that does not exist
    ]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert fake_nvml.load() is None
        assert [d["counted"] for d in meterage.gpu_info()["devices"]] == counted, value
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "names none of this machine's GPUs" in fake_nvml.load()


def test_gpu_info_describes_the_devices(fake_nvml):
    two_gpus(fake_nvml)
    info = meterage.gpu_info()
    assert info["reason"] is None
    assert info["library"] == fake_nvml.path
    assert info["driver_version"] == "550.54.15"
    assert [(d["index"], d["uuid"], d["name"]) for d in info["devices"]] == [
        (0, "GPU-fake-000", "NVIDIA Fake A100"),
        (1, "GPU-fake-111", "NVIDIA Fake A100"),
    ]
    assert info["host_pid"] == os.getpid()  # outside a PID namespace


def test_in_a_pid_namespace_gpu_memory_is_not_guessed(fake_nvml_library, tmp_path):
    """In a container's PID namespace NVML's (host) PIDs cannot be matched: gpu.memory is
    left out, with the reason in gpu_info(); energy is still recorded."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("util-linux's unshare is not installed")
    probe = subprocess.run(
        [unshare, "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot make a PID namespace here: {probe.stderr.strip()}")
    code = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from nvml_fake import FakeNvml
        fake = FakeNvml({fake_nvml_library!r})
        fake.reset()
        fake.add_device("NVIDIA Fake", "GPU-fake-ns", 1 << 30)
        fake.set_power(0, 50_000)
        fake.set_process(0, os.getpid(), 12345)  # this namespace's PID: not what NVML shows
        import meterage
        info = meterage.gpu_info()
        work = meterage.meter("ns", probes=("gpu",), sample=1.0)(lambda: None)
        work()
        (s,) = meterage.snapshot()
        print(os.getpid(), info["host_pid"], "PID namespace" in info["host_pid_reason"],
              s.histograms["gpu.memory"].count, s.histograms["gpu.energy.estimated"].count)
        """
    )
    env = {**os.environ, "METERAGE_NVML_LIBRARY": fake_nvml_library}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out = subprocess.run(
        [unshare, "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["1", "None", "True", "0", "1"]


def test_a_forked_child_matches_its_own_pid(fake_nvml, unique):
    one_gpu(fake_nvml)
    fake_nvml.set_process(0, os.getpid(), 1 * GIB)
    name = unique()
    work = meterage.meter(name, probes=("gpu",), sample=1.0)(lambda: None)
    work()
    assert measures(name)["gpu.memory"].sum == 1 * GIB
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own GPU memory, not the parent's
        try:
            fake_nvml.set_process(0, os.getpid(), 2 * GIB)
            work()
            os.write(write, str(measures(name)["gpu.memory"].sum).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_memory = pipe.read()
    os.waitpid(pid, 0)
    assert float(child_memory) == 2 * GIB


@pytest.mark.parametrize("r535", [False, True], ids=["v3", "r535-v3"])
def test_process_lists_of_any_length_and_entry_size(fake_nvml, monkeypatch, tmp_path, unique, r535):
    """Drivers 535.43-535.86 write 32-byte entries from the _v3 query; the others 24. More
    processes than the first buffer holds take NVML's "insufficient size" round trip."""
    from nvml_fake import FakeNvml, build

    if r535:
        fake = FakeNvml(build(tmp_path, r535=True))
        monkeypatch.setenv("METERAGE_NVML_LIBRARY", fake.path)
        fake.reset()
    else:
        fake = fake_nvml
    fake.add_device("NVIDIA Fake", "GPU-fake-layout", 80 * GIB)
    fake.set_power(0, 10_000)
    pid = os.getpid()
    for other in range(40):  # others first: this process is the last of 41
        fake.set_process(0, pid + 1 + other, (other + 1) << 20)
    fake.set_process(0, pid, 3 * GIB)
    assert fake_nvml.load() is None
    name = unique()
    meterage.meter(name, probes=("gpu",), sample=1.0)(lambda: None)()
    memory = measures(name)["gpu.memory"]
    assert (memory.count, memory.sum) == (1, 3 * GIB)
