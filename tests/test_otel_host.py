"""The host metrics (``system.*``, ``container.*``): opt-in, semantic-convention names, units
and attributes, and values that agree with what /proc, statvfs and the cgroup files say,
read independently here, at the same moment."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Gauge, InMemoryMetricReader, Sum

import meterage.otel
from meterage import _native
from meterage.otel._host import (
    HOST_METRIC_NAMES,
    HOST_METRICS_VARIABLE,
    cpu_shares,
    host_metrics_enabled,
    register_host_metrics,
)

linux_only = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")

CPU_MODES = {"user", "nice", "system", "idle", "iowait", "interrupt", "steal"}
MEMORY_STATES = {"used", "free", "buffers", "cached"}
DISK_KEYS = ("system.device", "disk.io.direction")
NETWORK_KEYS = ("network.interface.name", "network.io.direction")
FILESYSTEM_KEYS = (
    "system.device",
    "system.filesystem.state",
    "system.filesystem.type",
    "system.filesystem.mountpoint",
)

# name -> (data type, monotonic, unit, attribute keys)
EXPECTED: dict[str, tuple[type, bool | None, str, tuple[str, ...]]] = {
    "system.cpu.time": (Sum, True, "s", ("cpu.mode",)),
    "system.cpu.utilization": (Gauge, None, "1", ("cpu.mode",)),
    "system.memory.usage": (Sum, False, "By", ("system.memory.state",)),
    "system.memory.utilization": (Gauge, None, "1", ("system.memory.state",)),
    "system.memory.limit": (Sum, False, "By", ()),
    "system.disk.io": (Sum, True, "By", DISK_KEYS),
    "system.disk.operations": (Sum, True, "{operation}", DISK_KEYS),
    "system.network.io": (Sum, True, "By", NETWORK_KEYS),
    "system.network.packets": (Sum, True, "{packet}", NETWORK_KEYS),
    "system.network.errors": (Sum, True, "{error}", NETWORK_KEYS),
    "system.filesystem.usage": (Sum, False, "By", FILESYSTEM_KEYS),
    "container.cpu.limit": (Sum, False, "{cpu}", ()),
    "container.cpu.time": (Sum, True, "s", ()),
    "container.memory.usage": (Sum, False, "By", ()),
    "container.memory.limit": (Sum, False, "By", ()),
}
CONTAINER_METRICS = {name for name in EXPECTED if name.startswith("container.")}


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    register_host_metrics(provider.get_meter("meterage"))
    yield reader
    provider.shutdown()


def collect(reader: InMemoryMetricReader) -> dict[str, Any]:
    """Metric name -> Metric, from one collection (empty when nothing was observed)."""
    data = reader.get_metrics_data()
    if data is None:
        return {}
    return {
        metric.name: metric
        for resource_metrics in data.resource_metrics
        for scope in resource_metrics.scope_metrics
        for metric in scope.metrics
    }


def points(metric: Any, *keys: str) -> dict[Any, float | int]:
    """The values of a metric's points by their attribute values (one key: the value itself;
    several: a tuple; none: None)."""
    found = {}
    for point in metric.data.data_points:
        attributes = dict(point.attributes or {})
        assert set(attributes) == set(keys), (metric.name, attributes)
        label = tuple(attributes[key] for key in keys)
        found[label[0] if len(keys) == 1 else (label or None)] = point.value
    return found


# ---- independent readings of the sources -------------------------------------------------------


def proc_cpu_seconds() -> dict[str, float]:
    """The aggregate cpu line of /proc/stat, in seconds per mode."""
    with open("/proc/stat") as stat:
        fields = [int(field) for field in stat.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    hz = os.sysconf("SC_CLK_TCK")
    ticks = {
        "user": user,
        "nice": nice,
        "system": system,
        "idle": idle,
        "iowait": iowait,
        "interrupt": irq + softirq,
        "steal": steal,
    }
    return {mode: count / hz for mode, count in ticks.items()}


def proc_meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    values = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            key, _, rest = line.partition(":")
            number, *unit = rest.split()
            values[key] = int(number) * (1024 if unit == ["kB"] else 1)
    return values


def proc_diskstats() -> dict[str, tuple[int, int, int, int]]:
    """Device -> (read bytes, write bytes, read operations, write operations), every device."""
    disks = {}
    with open("/proc/diskstats") as diskstats:
        for line in diskstats:
            fields = line.split()
            reads, sectors_read, writes, sectors_written = (
                int(fields[index]) for index in (3, 5, 7, 9)
            )
            disks[fields[2]] = (sectors_read * 512, sectors_written * 512, reads, writes)
    return disks


def proc_net_dev() -> dict[str, list[int]]:
    """Interface -> its 16 counters."""
    with open("/proc/net/dev") as dev:
        return {
            name.strip(): [int(field) for field in numbers.split()]
            for name, _, numbers in (line.partition(":") for line in dev.readlines()[2:])
        }


def cgroup_v2_directory() -> tuple[Path | None, str]:
    """This process's cgroup v2 directory, or None and why there is none."""
    try:
        with open("/proc/self/cgroup") as cgroups:
            lines = cgroups.read().splitlines()
    except OSError as error:
        return None, f"/proc/self/cgroup unreadable: {error}"
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if path is None:
        return None, "cgroup v1 only (no 0:: line in /proc/self/cgroup)"
    with open("/proc/self/mounts") as mounts:
        mountpoint = next(
            (fields[1] for fields in map(str.split, mounts) if fields[2] == "cgroup2"), None
        )
    if mountpoint is None:
        return None, "no cgroup2 file system mounted"
    directory = Path(mountpoint) / path.lstrip("/")
    if not (directory / "cgroup.type").exists():
        return None, f"in the root cgroup v2 ({directory}): the whole machine, not a container"
    return directory, ""


CGROUP_DIRECTORY, NO_CGROUP_REASON = cgroup_v2_directory()


# ---- enabling ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "enabled"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        (" On ", True),
        ("0", False),
        ("False", False),
        ("no", False),
        ("OFF", False),
        ("", False),
    ],
)
def test_the_variable_turns_host_metrics_on_or_off(monkeypatch, value, enabled):
    monkeypatch.setenv(HOST_METRICS_VARIABLE, value)
    assert host_metrics_enabled(None) is enabled
    # The parameter wins over the variable.
    assert host_metrics_enabled(True) is True
    assert host_metrics_enabled(False) is False


def test_host_metrics_are_off_by_default(monkeypatch):
    monkeypatch.delenv(HOST_METRICS_VARIABLE, raising=False)
    assert host_metrics_enabled(None) is False


@pytest.mark.parametrize("value", ["2", "enabled", "y", "truee", "nein"])
def test_any_other_value_is_a_value_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(HOST_METRICS_VARIABLE, value)
    with pytest.raises(ValueError) as raised:
        host_metrics_enabled(None)
    message = str(raised.value)
    assert HOST_METRICS_VARIABLE in message and repr(value) in message
    assert "1/true/yes/on/0/false/no/off" in message


@pytest.mark.parametrize("host", ["yes", 1, 0.0])
def test_host_must_be_a_bool_or_none(host):
    with pytest.raises(TypeError, match=r"host must be True, False or None.*got"):
        host_metrics_enabled(host)


def attached_names(monkeypatch, environment: str | None, **options: Any) -> set[str]:
    """The metric names one collection of a freshly attached provider exports."""
    if environment is None:
        monkeypatch.delenv(HOST_METRICS_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(HOST_METRICS_VARIABLE, environment)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=False, spans=False, **options)
    try:
        return set(collect(reader))
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()


@linux_only
@pytest.mark.parametrize(
    ("environment", "options", "exported"),
    [
        (None, {}, False),
        ("on", {}, True),
        ("off", {}, False),
        (None, {"host": True}, True),
        ("1", {"host": False}, False),
        ("0", {"host": True}, True),
    ],
)
def test_attach_exports_host_metrics_only_when_asked(monkeypatch, environment, options, exported):
    names = attached_names(monkeypatch, environment, **options)
    assert "meterage.series" in names
    host_names = names & set(HOST_METRIC_NAMES)
    if exported:
        assert {"system.cpu.time", "system.memory.usage", "system.memory.limit"} <= host_names
    else:
        assert host_names == set()


def test_attach_with_a_bad_variable_raises_before_attaching(monkeypatch):
    monkeypatch.setenv(HOST_METRICS_VARIABLE, "maybe")
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    with pytest.raises(ValueError, match=HOST_METRICS_VARIABLE):
        meterage.otel.attach(provider)
    assert provider not in meterage.otel.attached_providers()
    provider.shutdown()


def test_configure_with_a_bad_variable_raises_before_building(monkeypatch):
    monkeypatch.setenv(HOST_METRICS_VARIABLE, "sometimes")
    with pytest.raises(ValueError, match=HOST_METRICS_VARIABLE):
        meterage.otel.configure()


@linux_only
def test_a_later_attach_can_add_host_metrics(monkeypatch):
    monkeypatch.delenv(HOST_METRICS_VARIABLE, raising=False)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        meterage.otel.attach(provider, spans=False)
        assert "system.cpu.time" not in collect(reader)
        meterage.otel.attach(provider, spans=False, host=True)
        assert "system.cpu.time" in collect(reader)
        meterage.otel.attach(provider, spans=False, host=True)  # once only
        assert len(collect(reader)["system.cpu.time"].data.data_points) == len(CPU_MODES)
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()


# ---- names, units, attributes ------------------------------------------------------------------


@linux_only
def test_every_metric_has_its_semantic_convention_name_unit_and_attributes(reader):
    metrics = collect(reader)
    assert set(HOST_METRIC_NAMES) == set(EXPECTED)
    expected = {name for name in EXPECTED if not name.startswith("container.")}
    assert expected <= set(metrics) <= set(EXPECTED)
    for name, metric in metrics.items():
        data_type, monotonic, unit, keys = EXPECTED[name]
        assert metric.unit == unit, name
        assert metric.description, name
        assert isinstance(metric.data, data_type), name
        if monotonic is not None:
            assert metric.data.is_monotonic is monotonic, name
        for point in metric.data.data_points:
            assert tuple(point.attributes or ()) == keys, (name, point.attributes)
            assert point.value >= 0, (name, point)
    assert set(points(metrics["system.cpu.time"], "cpu.mode")) == CPU_MODES
    assert set(points(metrics["system.memory.usage"], "system.memory.state")) == MEMORY_STATES


@linux_only
def test_native_reading_layout():
    reading = _native.host_metrics()
    assert set(reading) == {"cpu.time", "memory", "disks", "network", "filesystems", "container"}
    assert set(reading["cpu.time"]) == CPU_MODES
    assert all(isinstance(seconds, float) for seconds in reading["cpu.time"].values())
    assert set(reading["memory"]) == {"total", *MEMORY_STATES}
    for disk in reading["disks"]:
        assert set(disk) == {
            "device",
            "read.bytes",
            "write.bytes",
            "read.operations",
            "write.operations",
        }
    for interface in reading["network"]:
        assert set(interface) == {
            "interface",
            *(
                f"{direction}.{kind}"
                for direction in ("receive", "transmit")
                for kind in ("bytes", "packets", "errors")
            ),
        }
    for filesystem in reading["filesystems"]:
        assert set(filesystem) == {"device", "type", "mountpoint", "used", "free", "reserved"}
    assert set(reading["container"]) == {"cpu.limit", "cpu.time", "memory.usage", "memory.limit"}


# ---- values agree with the OS --------------------------------------------------------------------

TICK_S = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


@linux_only
def test_cpu_time_is_the_aggregate_line_of_proc_stat(reader):
    before = proc_cpu_seconds()
    cpu = points(collect(reader)["system.cpu.time"], "cpu.mode")
    after = proc_cpu_seconds()
    for mode in CPU_MODES:
        # Counters read between two readings of the same line; a tick of slack for iowait,
        # which the kernel sometimes moves back.
        assert before[mode] - TICK_S <= cpu[mode] <= after[mode] + TICK_S, (mode, before, cpu)


@linux_only
def test_first_utilization_is_the_share_since_boot(reader):
    before = proc_cpu_seconds()
    shares = points(collect(reader)["system.cpu.utilization"], "cpu.mode")
    assert set(shares) == CPU_MODES
    assert all(0.0 <= share <= 1.0 for share in shares.values()), shares
    assert math.isclose(sum(shares.values()), 1.0, abs_tol=1e-9)
    total = sum(before.values())
    for mode in CPU_MODES:
        # A few ticks between the two readings change a share since boot by far less.
        assert abs(shares[mode] - before[mode] / total) <= 0.001, (mode, shares)


@linux_only
def test_later_utilization_sums_to_one(reader, burn):
    collect(reader)
    burn(30_000_000)  # 30 ms of CPU: three ticks at least
    shares = points(collect(reader)["system.cpu.utilization"], "cpu.mode")
    assert all(0.0 <= share <= 1.0 for share in shares.values()), shares
    assert math.isclose(sum(shares.values()), 1.0, abs_tol=1e-9)
    assert shares["user"] + shares["system"] > 0


def fake_reading(cpu: dict[str, float] | None = None, **sections: Any) -> dict[str, Any]:
    reading: dict[str, Any] = {
        "cpu.time": cpu,
        "memory": None,
        "disks": [],
        "network": [],
        "filesystems": [],
        "container": dict.fromkeys(("cpu.limit", "cpu.time", "memory.usage", "memory.limit")),
    }
    reading.update(sections)
    return reading


def test_utilization_is_each_modes_share_of_the_cpu_time_since_the_previous_collection(
    reader, monkeypatch
):
    cpu_readings = iter(
        [
            {"user": 10.0, "idle": 30.0, "iowait": 0.0},  # since boot
            {"user": 20.0, "idle": 40.0, "iowait": 0.0},  # +10 user, +10 idle
            {"user": 20.0, "idle": 40.0, "iowait": 0.0},  # no tick since: left out
            {"user": 50.0, "idle": 40.0, "iowait": 0.0},  # +30 user since the second
            {"user": 50.0, "idle": 46.0, "iowait": -1.0},  # iowait went back: no time
        ]
    )
    monkeypatch.setattr(_native, "host_metrics", lambda: fake_reading(next(cpu_readings)))
    observed = [
        points(metrics["system.cpu.utilization"], "cpu.mode")
        if "system.cpu.utilization" in (metrics := collect(reader))
        else None
        for _ in range(5)
    ]
    assert observed == [
        {"user": 0.25, "idle": 0.75, "iowait": 0.0},
        {"user": 0.5, "idle": 0.5, "iowait": 0.0},
        None,
        {"user": 1.0, "idle": 0.0, "iowait": 0.0},
        {"user": 0.0, "idle": 1.0, "iowait": 0.0},
    ]


def test_cpu_shares():
    assert cpu_shares({}, {"user": 1.0, "idle": 3.0}) == {"user": 0.25, "idle": 0.75}
    assert cpu_shares({"user": 1.0, "idle": 3.0}, {"user": 1.0, "idle": 3.0}) is None


@linux_only
def test_memory_matches_meminfo(reader):
    metrics = collect(reader)
    meminfo = proc_meminfo()
    limit = points(metrics["system.memory.limit"])[None]
    assert limit == meminfo["MemTotal"]  # exact: MemTotal in KiB times 1024
    usage = points(metrics["system.memory.usage"], "system.memory.state")
    assert sum(usage.values()) == limit  # the states of one reading add up to the total
    independent = {
        "free": meminfo["MemFree"],
        "buffers": meminfo["Buffers"],
        "cached": meminfo["Cached"] + meminfo["SReclaimable"],
    }
    independent["used"] = limit - sum(independent.values())
    for state, expected in independent.items():
        # Other processes allocate and free between the two readings: 2% of the memory.
        assert abs(usage[state] - expected) <= 0.02 * limit, (state, usage, independent)
    utilization = points(metrics["system.memory.utilization"], "system.memory.state")
    assert utilization == {state: usage[state] / limit for state in MEMORY_STATES}
    assert math.isclose(sum(utilization.values()), 1.0, abs_tol=1e-9)


@linux_only
def test_disk_counters_lie_between_readings_of_diskstats(reader, tmp_path):
    (tmp_path / "payload").write_bytes(os.urandom(1 << 20))
    os.sync()  # some storage IO to count
    before = proc_diskstats()
    metrics = collect(reader)
    after = proc_diskstats()
    io = points(metrics["system.disk.io"], *DISK_KEYS) if "system.disk.io" in metrics else {}
    operations = (
        points(metrics["system.disk.operations"], *DISK_KEYS)
        if "system.disk.operations" in metrics
        else {}
    )
    reported = {device for device, _ in io}
    assert reported == {device for device, _ in operations}

    def real(disks: dict[str, tuple[int, ...]]) -> set[str]:
        virtual = ("loop", "ram", "zram")
        return {d for d, counts in disks.items() if any(counts) and not d.startswith(virtual)}

    assert real(before) <= reported <= real(after)
    for device in reported:
        low, high = before.get(device, (0, 0, 0, 0)), after[device]
        values = (
            io[device, "read"],
            io[device, "write"],
            operations[device, "read"],
            operations[device, "write"],
        )
        for index, value in enumerate(values):
            assert low[index] <= value <= high[index], (device, index, low, values, high)


@linux_only
def test_network_counters_lie_between_readings_of_net_dev(reader):
    before = proc_net_dev()
    metrics = collect(reader)
    after = proc_net_dev()
    # field index in /proc/net/dev for each (metric, direction)
    fields = {
        "system.network.io": {"receive": 0, "transmit": 8},
        "system.network.packets": {"receive": 1, "transmit": 9},
        "system.network.errors": {"receive": 2, "transmit": 10},
    }
    for name, directions in fields.items():
        found = points(metrics[name], *NETWORK_KEYS)
        assert {interface for interface, _ in found} == set(after) == set(before)
        for (interface, direction), value in found.items():
            index = directions[direction]
            assert before[interface][index] <= value <= after[interface][index], (name, interface)


@linux_only
def test_loopback_traffic_is_counted(reader):
    if "lo" not in proc_net_dev():
        pytest.skip("no loopback interface in this network namespace")
    payload, datagrams = 1000, 50

    def loopback(metrics: dict[str, Any]) -> tuple[int, int]:
        io = points(metrics["system.network.io"], *NETWORK_KEYS)
        packets = points(metrics["system.network.packets"], *NETWORK_KEYS)
        return io["lo", "receive"], packets["lo", "receive"]

    bytes_before, packets_before = loopback(collect(reader))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(datagrams):
                sender.sendto(b"x" * payload, receiver.getsockname())
                receiver.recv(payload)
    bytes_after, packets_after = loopback(collect(reader))
    assert bytes_after - bytes_before >= payload * datagrams  # plus IP and UDP headers
    assert packets_after - packets_before >= datagrams


def mounted_types() -> dict[str, str]:
    with open("/proc/self/mounts") as mounts:
        return {fields[1]: fields[2] for fields in map(str.split, mounts)}


@linux_only
def test_filesystem_usage_matches_statvfs(reader):
    usage = points(collect(reader)["system.filesystem.usage"], *FILESYSTEM_KEYS)
    by_mountpoint: dict[str, dict[str, int]] = {}
    for (device, state, filesystem_type, mountpoint), value in usage.items():
        assert mounted_types()[mountpoint] == filesystem_type, mountpoint
        assert device, mountpoint
        by_mountpoint.setdefault(mountpoint, {})[state] = value
    devices = [os.stat(mountpoint).st_dev for mountpoint in by_mountpoint]
    assert len(devices) == len(set(devices)), "a file system reported twice"
    for mountpoint, states in by_mountpoint.items():
        assert set(states) == {"used", "free", "reserved"}
        stats = os.statvfs(mountpoint)
        # The size does not change: exact. What is used moves with other processes'
        # writes between the two readings: 256 MiB.
        assert sum(states.values()) == stats.f_blocks * stats.f_frsize, mountpoint
        independent = {
            "used": (stats.f_blocks - stats.f_bfree) * stats.f_frsize,
            "free": stats.f_bavail * stats.f_frsize,
            "reserved": (stats.f_bfree - stats.f_bavail) * stats.f_frsize,
        }
        for state, expected in independent.items():
            assert abs(states[state] - expected) <= 256 << 20, (mountpoint, state)


@linux_only
def test_pseudo_file_systems_are_left_out_and_the_root_is_in(reader):
    mountpoints = {
        key[3] for key in points(collect(reader)["system.filesystem.usage"], *FILESYSTEM_KEYS)
    }
    types = mounted_types()
    pseudo = {"proc", "sysfs", "tmpfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "mqueue"}
    assert not {mountpoint for mountpoint in mountpoints if types[mountpoint] in pseudo}
    if types.get("/") not in pseudo | {"nfs", "nfs4", "cifs"}:
        assert "/" in mountpoints


# ---- containers ----------------------------------------------------------------------------------


def read_cgroup_file(name: str) -> str | None:
    assert CGROUP_DIRECTORY is not None
    try:
        return (CGROUP_DIRECTORY / name).read_text().strip()
    except OSError:
        return None


def cgroup_cpu_seconds() -> float | None:
    text = read_cgroup_file("cpu.stat")
    if text is None:
        return None
    usage = next(line for line in text.splitlines() if line.startswith("usage_usec "))
    return int(usage.split()[1]) / 1e6


@pytest.mark.skipif(CGROUP_DIRECTORY is None, reason=f"no cgroup v2 here: {NO_CGROUP_REASON}")
def test_container_metrics_match_the_cgroup_files(reader):
    cpu_before = cgroup_cpu_seconds()
    metrics = collect(reader)
    cpu_after = cgroup_cpu_seconds()
    exported = {name: points(metrics[name])[None] for name in CONTAINER_METRICS if name in metrics}
    cpu_max = read_cgroup_file("cpu.max")
    if cpu_max is None or cpu_max.startswith("max"):
        assert "container.cpu.limit" not in exported
    else:
        quota, period = map(int, cpu_max.split())
        assert exported["container.cpu.limit"] == quota / period
    memory_max = read_cgroup_file("memory.max")
    if memory_max is None or memory_max == "max":
        assert "container.memory.limit" not in exported
    else:
        assert exported["container.memory.limit"] == int(memory_max)
    if cpu_before is None:
        assert "container.cpu.time" not in exported
    else:
        assert cpu_before <= exported["container.cpu.time"] <= cpu_after
    current = read_cgroup_file("memory.current")
    if current is None:
        assert "container.memory.usage" not in exported
    else:
        # Memory of this cgroup moves between readings: 64 MiB.
        assert abs(exported["container.memory.usage"] - int(current)) <= 64 << 20


@linux_only
@pytest.mark.skipif(CGROUP_DIRECTORY is not None, reason="this process is in a cgroup v2")
def test_no_container_metrics_outside_a_cgroup_v2(reader):
    # NO_CGROUP_REASON says why (cgroup v1, or the root of a hybrid machine's v2 hierarchy).
    assert not CONTAINER_METRICS & set(collect(reader)), NO_CGROUP_REASON


def test_container_values_are_exported_as_read(reader, monkeypatch):
    container = {"cpu.limit": 1.5, "cpu.time": 12.25, "memory.usage": 1 << 30, "memory.limit": None}
    monkeypatch.setattr(_native, "host_metrics", lambda: fake_reading(container=container))
    metrics = collect(reader)
    assert set(metrics) == {"container.cpu.limit", "container.cpu.time", "container.memory.usage"}
    assert points(metrics["container.cpu.limit"]) == {None: 1.5}
    assert points(metrics["container.cpu.time"]) == {None: 12.25}
    assert points(metrics["container.memory.usage"]) == {None: 1 << 30}


# ---- one reading per collection, missing sources -------------------------------------------------


def test_each_collection_reads_the_host_once(reader, monkeypatch):
    reading = mock.Mock(wraps=_native.host_metrics)
    monkeypatch.setattr(_native, "host_metrics", reading)
    collect(reader)
    assert reading.call_count == 1
    collect(reader)  # straight after: a new collection all the same
    assert reading.call_count == 2


def test_unavailable_sources_are_left_out(reader, monkeypatch):
    monkeypatch.setattr(_native, "host_metrics", fake_reading)
    assert collect(reader) == {}
    memory = {"total": 100, "used": 40, "free": 30, "buffers": 10, "cached": 20}
    monkeypatch.setattr(_native, "host_metrics", lambda: fake_reading(memory=memory))
    metrics = collect(reader)
    assert set(metrics) == {
        "system.memory.usage",
        "system.memory.utilization",
        "system.memory.limit",
    }
    assert points(metrics["system.memory.utilization"], "system.memory.state") == {
        "used": 0.4,
        "free": 0.3,
        "buffers": 0.1,
        "cached": 0.2,
    }
