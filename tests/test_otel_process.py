"""The ``process.*`` OpenTelemetry metrics: semantic-convention names, units and attributes,
and values that agree with what the OS says about this process at the same moment."""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Gauge, InMemoryMetricReader, Sum

from meterage import _native
from meterage.otel._process import PROCESS_METRIC_NAMES, register_process_metrics

linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")

# name -> (data type, monotonic, unit, attribute key, attribute values)
EXPECTED: dict[str, tuple[type, bool | None, str, str | None, set[str]]] = {
    "process.cpu.time": (Sum, True, "s", "cpu.mode", {"user", "system"}),
    "process.cpu.utilization": (Gauge, None, "1", "cpu.mode", {"user", "system"}),
    "process.memory.usage": (Sum, False, "By", None, set()),
    "process.memory.virtual": (Sum, False, "By", None, set()),
    "process.disk.io": (Sum, True, "By", "disk.io.direction", {"read", "write"}),
    "process.network.io": (Sum, True, "By", "network.io.direction", {"receive", "transmit"}),
    "process.context_switches": (
        Sum,
        True,
        "{context_switch}",
        "process.context_switch.type",
        {"voluntary", "involuntary"},
    ),
    "process.paging.faults": (
        Sum,
        True,
        "{fault}",
        "system.paging.fault.type",
        {"minor", "major"},
    ),
    "process.thread.count": (Sum, False, "{thread}", None, set()),
    "process.unix.file_descriptor.count": (Sum, False, "{file_descriptor}", None, set()),
    "process.uptime": (Gauge, None, "s", None, set()),
}


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    register_process_metrics(provider.get_meter("meterage"))
    yield reader
    provider.shutdown()


def collect(reader: InMemoryMetricReader) -> dict[str, Any]:
    """Metric name -> Metric, from one collection."""
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: metric
        for resource_metrics in data.resource_metrics
        for scope in resource_metrics.scope_metrics
        for metric in scope.metrics
    }


def values(metric: Any) -> dict[str | None, float | int]:
    """Attribute value (None without attributes) -> data point value."""
    points = {}
    for point in metric.data.data_points:
        attributes = dict(point.attributes or {})
        assert len(attributes) <= 1, attributes
        points[next(iter(attributes.values()), None)] = point.value
    return points


def value(reader: InMemoryMetricReader, name: str, attribute: str | None = None) -> Any:
    return values(collect(reader)[name])[attribute]


def proc_status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key == field:
                return int(rest.split()[0])
    raise KeyError(field)


def net_dev_totals() -> tuple[int, int]:
    receive = transmit = 0
    with open("/proc/self/net/dev") as dev:
        for line in dev.readlines()[2:]:
            name, _, numbers = line.partition(":")
            if name.strip() != "lo":
                fields = numbers.split()
                receive += int(fields[0])
                transmit += int(fields[8])
    return receive, transmit


# ---- names, units, attributes ------------------------------------------------------------------


@linux_only
def test_every_metric_has_its_semantic_convention_name_unit_and_attributes(reader):
    metrics = collect(reader)
    expected = dict(EXPECTED)
    if _native.process_metrics()["network.io.receive"] is None:
        del expected["process.network.io"]
    assert set(metrics) == set(expected)
    assert set(PROCESS_METRIC_NAMES) == set(EXPECTED)
    for name, (data_type, monotonic, unit, key, attribute_values) in expected.items():
        metric = metrics[name]
        assert metric.unit == unit, name
        assert metric.description, name
        assert isinstance(metric.data, data_type), name
        if monotonic is not None:
            assert metric.data.is_monotonic is monotonic, name
        points = metric.data.data_points
        if key is None:
            assert len(points) == 1 and not points[0].attributes, (name, points)
        else:
            assert {tuple(point.attributes) for point in points} == {(key,)}, name
            assert {point.attributes[key] for point in points} == attribute_values, name
        for point in points:
            assert point.value >= 0, (name, point)
            expected_type = float if name in {"process.cpu.time", "process.uptime"} else int
            if data_type is Sum:
                assert isinstance(point.value, expected_type), (name, point.value)


def test_native_reading_has_every_key():
    reading = _native.process_metrics()
    assert set(reading) == {
        "cpu.time.user",
        "cpu.time.system",
        "memory.usage",
        "memory.virtual",
        "disk.io.read",
        "disk.io.write",
        "network.io.receive",
        "network.io.transmit",
        "context_switches.voluntary",
        "context_switches.involuntary",
        "paging.faults.minor",
        "paging.faults.major",
        "thread.count",
        "open_file_descriptor.count",
        "uptime",
    }
    seconds = {"cpu.time.user", "cpu.time.system", "uptime"}
    for key, number in reading.items():
        assert number is None or isinstance(number, float if key in seconds else int), key


# ---- values agree with the OS --------------------------------------------------------------------


@linux_only
def test_open_descriptors_match_proc(reader):
    count = value(reader, "process.unix.file_descriptor.count")
    listed = len(os.listdir("/proc/self/fd"))  # includes the descriptor listing it
    assert abs(count - listed) <= 2


@linux_only
def test_open_descriptors_follow_opened_files(reader, tmp_path):
    before = value(reader, "process.unix.file_descriptor.count")
    files = [open(tmp_path / f"f{index}", "w") for index in range(20)]
    try:
        during = value(reader, "process.unix.file_descriptor.count")
    finally:
        for file in files:
            file.close()
    assert abs(during - before - 20) <= 2  # a background thread may hold one more or less


@linux_only
def test_thread_count_is_the_native_thread_count(reader):
    release = threading.Event()
    threads = [threading.Thread(target=release.wait) for _ in range(5)]
    for thread in threads:
        thread.start()
    try:
        low = proc_status("Threads")
        count = value(reader, "process.thread.count")
        high = proc_status("Threads")
        python_threads = threading.active_count()
    finally:
        release.set()
        for thread in threads:
            thread.join()
    assert low <= count <= high
    # Native threads: at least every Python thread (a library may run more of its own).
    assert count >= python_threads >= 6


@linux_only
def test_cpu_time_covers_the_process_cpu_clock(reader, burn):
    burn(50_000_000)
    floor = time.process_time()
    points = values(collect(reader)["process.cpu.time"])
    ceiling = time.process_time()
    total = points["user"] + points["system"]
    # getrusage's total is the exact scheduler time, truncated to microseconds.
    tick = 0.02
    assert floor - tick <= total <= ceiling + tick, (floor, total, ceiling)
    assert points["user"] > 0


@linux_only
def test_memory_matches_statm(reader):
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as statm:
        size, resident = (int(field) * page for field in statm.read().split()[:2])
    metrics = collect(reader)
    usage = values(metrics["process.memory.usage"])[None]
    virtual = values(metrics["process.memory.virtual"])[None]
    assert abs(usage - resident) <= 8 << 20, (usage, resident)
    assert abs(virtual - size) <= 64 << 20, (virtual, size)
    assert virtual >= usage


@linux_only
def test_faults_and_switches_agree_with_getrusage(reader):
    before = resource.getrusage(resource.RUSAGE_SELF)
    metrics = collect(reader)
    after = resource.getrusage(resource.RUSAGE_SELF)
    faults = values(metrics["process.paging.faults"])
    switches = values(metrics["process.context_switches"])
    assert before.ru_minflt <= faults["minor"] <= after.ru_minflt
    assert before.ru_majflt <= faults["major"] <= after.ru_majflt
    assert before.ru_nvcsw <= switches["voluntary"] <= after.ru_nvcsw
    assert before.ru_nivcsw <= switches["involuntary"] <= after.ru_nivcsw


@linux_only
def test_context_switches_of_every_thread_count(reader):
    before = value(reader, "process.context_switches", "voluntary")
    thread = threading.Thread(target=lambda: [time.sleep(0.001) for _ in range(10)])
    thread.start()
    thread.join()
    after = value(reader, "process.context_switches", "voluntary")
    assert after - before >= 10


@linux_only
def test_fresh_pages_are_minor_faults_and_resident(reader):
    metrics = collect(reader)
    faults_before = values(metrics["process.paging.faults"])["minor"]
    resident_before = values(metrics["process.memory.usage"])[None]
    memory = bytearray(64 << 20)  # fresh pages, zeroed: each one faults and becomes resident
    memory[::4096] = b"\1" * (len(memory) // 4096)
    metrics = collect(reader)
    assert values(metrics["process.paging.faults"])["minor"] - faults_before >= 32
    assert values(metrics["process.memory.usage"])[None] - resident_before >= 48 << 20
    del memory


@linux_only
def test_disk_writes_are_counted(reader, tmp_path):
    before = value(reader, "process.disk.io", "write")
    fd = os.open(tmp_path / "payload", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, os.urandom(1 << 20))
        os.fsync(fd)
    finally:
        os.close(fd)
    written = value(reader, "process.disk.io", "write") - before
    if written == 0:
        pytest.skip(f"{tmp_path} does not account storage writes (tmpfs?)")
    assert written >= 1 << 20


@pytest.mark.skipif(not os.path.exists("/proc/self/net/dev"), reason="needs /proc/self/net/dev")
def test_network_bytes_are_the_namespace_totals_without_loopback(reader):
    receive_before, transmit_before = net_dev_totals()
    points = values(collect(reader)["process.network.io"])
    receive_after, transmit_after = net_dev_totals()
    assert receive_before <= points["receive"] <= receive_after
    assert transmit_before <= points["transmit"] <= transmit_after


@linux_only
def test_uptime_matches_the_start_time(reader):
    with open("/proc/self/stat") as stat:
        start_ticks = int(stat.read().rpartition(")")[2].split()[22 - 3])
    with open("/proc/uptime") as uptime:
        since_boot = float(uptime.read().split()[0])
    expected = since_boot - start_ticks / os.sysconf("SC_CLK_TCK")
    assert abs(value(reader, "process.uptime") - expected) <= 0.1


# ---- utilization ---------------------------------------------------------------------------------


@linux_only
def test_first_utilization_is_since_the_process_started(reader):
    points = values(collect(reader)["process.cpu.utilization"])
    assert set(points) == {"user", "system"}
    for utilization in points.values():
        assert 0.0 <= utilization <= 1.0
    assert points["user"] + points["system"] > 0


def timed_utilization(reader: InMemoryMetricReader) -> tuple[dict, tuple[float, ...]]:
    """One collection's utilization, with the process CPU clock and the monotonic clock
    read just before and just after it."""
    cpu_before, wall_before = time.process_time(), time.monotonic()
    points = values(collect(reader)["process.cpu.utilization"])
    return points, (cpu_before, wall_before, time.process_time(), time.monotonic())


@linux_only
def test_utilization_is_the_cpu_share_since_the_previous_collection(reader, burn):
    cpus = len(os.sched_getaffinity(0))
    _, first = timed_utilization(reader)
    burn(200_000_000)  # this thread busy for 0.2 s of CPU
    busy, second = timed_utilization(reader)
    time.sleep(0.2)
    idle, _ = timed_utilization(reader)
    for points in (busy, idle):
        assert all(0.0 <= utilization <= 1.0 for utilization in points.values()), points
    # The two readings lie inside the bracketing clock readings, so the share of the CPUs
    # used between them lies between these bounds (slack: getrusage's microseconds and
    # sub-millisecond rounding; the load on the machine does not matter).
    cpu_low, cpu_high = second[0] - first[2], second[2] - first[0]
    wall_low, wall_high = second[1] - first[3], second[3] - first[1]
    low, high = cpu_low / (wall_high * cpus), cpu_high / (wall_low * cpus)
    total = busy["user"] + busy["system"]
    assert low - 0.01 <= total <= high + 0.01, (low, total, high)
    assert total > 0
    assert idle["user"] + idle["system"] < total, (idle, busy)


@linux_only
def test_a_forked_child_measures_its_own_utilization(reader):
    collect(reader)  # the parent's CPU times become the "previous" reading
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            end = time.monotonic() + 0.05
            while time.monotonic() < end:
                pass
            points = values(collect(reader)["process.cpu.utilization"])
            in_range = all(0 <= share <= 1 for share in points.values())
            code = 0 if in_range and points["user"] + points["system"] > 0 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# ---- one reading per collection ------------------------------------------------------------------


def count_native_readings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = _native.process_metrics

    def counting() -> dict[str, Any]:
        calls.append(1)
        return real()

    monkeypatch.setattr(_native, "process_metrics", counting)
    return calls


def test_each_collection_reads_the_process_once(reader, monkeypatch):
    calls = count_native_readings(monkeypatch)
    collect(reader)
    assert len(calls) == 1
    collect(reader)  # straight after: a new collection all the same
    assert len(calls) == 2


def test_each_reader_of_a_provider_gets_its_own_reading(monkeypatch):
    readers = [InMemoryMetricReader(), InMemoryMetricReader()]
    provider = MeterProvider(metric_readers=readers)
    register_process_metrics(provider.get_meter("meterage"))
    calls = count_native_readings(monkeypatch)
    try:
        for one in readers:
            assert "process.cpu.time" in collect(one)
    finally:
        provider.shutdown()
    assert len(calls) == 2


def test_unavailable_values_are_left_out(reader, monkeypatch):
    reading = dict.fromkeys(_native.process_metrics())
    reading["thread.count"] = 3
    monkeypatch.setattr(_native, "process_metrics", lambda: dict(reading))
    metrics = collect(reader)
    assert set(metrics) == {"process.thread.count"}
    assert values(metrics["process.thread.count"]) == {None: 3}
