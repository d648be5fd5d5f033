"""The ``process.*`` metrics in multiprocess mode: one series per live member of the group,
each with ``process.pid``, read from ``/proc/<pid>``; the network namespace's bytes once.

Joining a group is for good in a process, so the real-group tests run their scenario in a
fresh Python process (``run``), which prints one JSON line with what it saw.
"""

from __future__ import annotations

import functools
import os
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
import scenario

pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from meterage import _native, multiprocess
from meterage.otel import _process
from meterage.otel._process import PROCESS_METRIC_NAMES, register_process_metrics

linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")

PRELUDE = """
import json, os, sys, time
import meterage, meterage.multiprocess as mp, meterage.otel
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

reader = InMemoryMetricReader()
provider = MeterProvider(metric_readers=[reader])
meterage.otel.attach(provider, spans=False, gpu=False, host=False)

def collect():
    '''{metric name: [[attributes, value], ...]} of the process.* metrics.'''
    data = reader.get_metrics_data()
    return {
        metric.name: [
            [dict(point.attributes or {}), point.value] for point in metric.data.data_points
        ]
        for resource_metrics in data.resource_metrics
        for scope in resource_metrics.scope_metrics
        for metric in scope.metrics
        if metric.name.startswith("process.")
    }

def burn(seconds):
    started = time.process_time()
    while time.process_time() - started < seconds:
        pass

def done(**seen):
    print("RESULT " + json.dumps(seen), flush=True)
"""


#: Runs a script after this file's PRELUDE in a fresh interpreter (scenario.run).
run = functools.partial(scenario.run, PRELUDE)


# Children that burn a known CPU time, then wait (alive) until told to exit.
CHILDREN = """
children = {}
for amount in BURN:
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        burn(amount)
        os.write(ready_write, b"x")
        os.read(go_read, 1)
        os._exit(0)
    os.close(ready_write)
    os.close(go_read)
    children[pid] = (amount, ready_read, go_write)
for amount, ready_read, go_write in children.values():
    assert os.read(ready_read, 1) == b"x"

def end(pid):
    amount, ready_read, go_write = children.pop(pid)
    os.write(go_write, b"x")
    os.waitpid(pid, 0)
"""

BURN = (0.2, 0.4, 0.6)


def with_children(burn: tuple[float, ...], script: str) -> str:
    """``script`` after CHILDREN forked, one per amount of CPU seconds in ``burn``."""
    return f"BURN = {burn!r}\n" + CHILDREN + textwrap.dedent(script)


def by_pid(points: list[list[Any]]) -> dict[int, dict[str | None, Any]]:
    """pid -> {the other attribute's value (None without one): value}."""
    result: dict[int, dict[str | None, Any]] = {}
    for attributes, value in points:
        pid = attributes.pop("process.pid")
        assert isinstance(pid, int)
        assert len(attributes) <= 1, attributes
        result.setdefault(pid, {})[next(iter(attributes.values()), None)] = value
    return result


@linux_only
def test_every_live_member_is_reported_with_its_pid() -> None:
    seen = run(
        with_children(
            BURN,
            """
        first = collect()
        members_then = mp.members()
        burned = {pid: amount for pid, (amount, _, _) in children.items()}
        gone = min(children)
        end(gone)
        second = collect()
        done(
            me=os.getpid(),
            burned=burned,
            gone=gone,
            members_then=members_then,
            members_after=mp.members(),
            first=first,
            second=second,
            tick=1 / os.sysconf("SC_CLK_TCK"),
        )
        for pid in list(children):
            end(pid)
        """,
        )
    )
    me, gone, tick = seen["me"], seen["gone"], seen["tick"]
    burned = {int(pid): amount for pid, amount in seen["burned"].items()}
    children = set(burned)
    assert children | {me} <= set(seen["members_then"])
    assert gone not in seen["members_after"]
    first, second = seen["first"], seen["second"]
    assert set(PROCESS_METRIC_NAMES) - {"process.network.io"} <= set(first)

    # Each process metric: one series per live member (the same pids, the live members'),
    # the network namespace's bytes once, without a pid.
    for name, points in first.items():
        if name == "process.network.io":
            assert sorted(a["network.io.direction"] for a, _ in points) == ["receive", "transmit"]
            assert all("process.pid" not in attributes for attributes, _ in points)
            continue
        pids = set(by_pid([[dict(a), v] for a, v in points]))
        assert pids == set(seen["members_then"]), (name, pids)
        assert children | {me} <= pids

    cpu = by_pid(first["process.cpu.time"])
    threads = by_pid(first["process.thread.count"])
    memory = by_pid(first["process.memory.usage"])
    descriptors = by_pid(first["process.unix.file_descriptor.count"])
    uptime = by_pid(first["process.uptime"])
    utilization = by_pid(first["process.cpu.utilization"])
    for pid in children | {me}:
        assert set(cpu[pid]) == {"user", "system"}
        assert threads[pid][None] >= 1
        assert memory[pid][None] > 0
        assert descriptors[pid][None] >= 3
        assert uptime[pid][None] > 0
        assert set(utilization[pid]) == {"user", "system"}
        assert all(0 <= share <= 1 for share in utilization[pid].values())
    for pid, amount in burned.items():
        used = cpu[pid]["user"] + cpu[pid]["system"]
        # /proc/<pid>/stat truncates user and system to clock ticks, each.
        assert amount - 2 * tick <= used <= amount + 0.3, (pid, amount, used)

    # A member that exited is no longer reported; the others are, with counters that grew
    # no less than they were.
    for name, points in second.items():
        if name == "process.network.io":
            continue
        pids = set(by_pid([[dict(a), v] for a, v in points]))
        assert gone not in pids, name
        assert (children - {gone}) | {me} <= pids, name
    cpu_after = by_pid(second["process.cpu.time"])
    for pid in children - {gone}:
        for mode in ("user", "system"):
            assert cpu_after[pid][mode] >= cpu[pid][mode]


@linux_only
def test_outside_multiprocess_mode_the_process_metrics_have_no_pid() -> None:
    seen = run(
        """
        done(metrics=collect(), enabled=mp.is_enabled())
        """,
        multiprocess=False,
    )
    assert not seen["enabled"]
    assert "process.cpu.time" in seen["metrics"]
    for points in seen["metrics"].values():
        assert all("process.pid" not in attributes for attributes, _ in points)


@linux_only
def test_each_process_exporting_its_own_numbers_reports_only_itself() -> None:
    seen = run(
        with_children(
            (0.01,),
            """
        metrics, members = collect(), mp.members()
        for pid in list(children):
            end(pid)
        done(metrics=metrics, members=members, enabled=mp.is_enabled())
        """,
        ),
        env={"METERAGE_EXPORT_PER_PROCESS": "1"},
    )
    assert seen["enabled"] and len(seen["members"]) >= 2
    for name, points in seen["metrics"].items():
        assert all("process.pid" not in attributes for attributes, _ in points), name
    assert len(seen["metrics"]["process.thread.count"]) == 1


# ---- with a stand-in group (in this process) -------------------------------------------------


@pytest.fixture
def group(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, dict[str, Any]]]:
    """Multiprocess mode with members 11 and 12 whose readings the test sets."""
    readings: dict[int, dict[str, Any]] = {}
    base = dict.fromkeys(_native.process_metrics())
    monkeypatch.setattr(_process, "_per_member", lambda: True)
    monkeypatch.setattr(multiprocess, "members", lambda: sorted(readings))
    monkeypatch.setattr(
        _native,
        "process_metrics_of",
        lambda pids: {pid: {**base, **readings[pid]} for pid in pids if pid in readings},
    )
    yield readings


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    register_process_metrics(provider.get_meter("meterage"))
    yield reader
    provider.shutdown()


def points_of(reader: InMemoryMetricReader) -> dict[str, list[list[Any]]]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: [[dict(p.attributes or {}), p.value] for p in metric.data.data_points]
        for rm in data.resource_metrics
        for scope in rm.scope_metrics
        for metric in scope.metrics
    }


def test_context_switches_never_go_down_while_a_member_lives(group, reader):
    group[11] = {"start_time": 5, "context_switches.voluntary": 100, "thread.count": 3}
    group[12] = {"start_time": 6, "context_switches.voluntary": 40, "thread.count": 1}

    def switches() -> dict[int, Any]:
        points = by_pid(points_of(reader)["process.context_switches"])
        return {pid: values["voluntary"] for pid, values in points.items()}

    assert switches() == {11: 100, 12: 40}
    group[11]["context_switches.voluntary"] = 90  # a thread with 10+ switches exited
    group[12]["context_switches.voluntary"] = 45
    assert switches() == {11: 100, 12: 45}
    group[11]["context_switches.voluntary"] = 130
    assert switches() == {11: 130, 12: 45}
    # PID 12 reused by a new process (another start time): its own count, from its start.
    group[12] = {"start_time": 9, "context_switches.voluntary": 3}
    assert switches() == {11: 130, 12: 3}


def test_utilization_is_each_members_own(group, reader, monkeypatch):
    monkeypatch.setattr(_process, "_usable_cpus", lambda pid=0: 2)
    group[11] = {"start_time": 1, "cpu.time.user": 1.0, "cpu.time.system": 0.0, "uptime": 10.0}
    group[12] = {"start_time": 2, "cpu.time.user": 0.0, "cpu.time.system": 2.0, "uptime": 5.0}
    first = by_pid(points_of(reader)["process.cpu.utilization"])
    # Since each started: CPU over uptime times 2 CPUs.
    assert first[11] == pytest.approx({"user": 0.05, "system": 0.0})
    assert first[12] == pytest.approx({"user": 0.0, "system": 0.2})
    group.pop(12)
    group[11]["cpu.time.user"] = 1.0 + 1e9  # beyond any wall time since: clamped to 1
    second = by_pid(points_of(reader)["process.cpu.utilization"])
    assert set(second) == {11}
    assert second[11]["user"] == 1.0


def test_network_bytes_are_observed_once_without_a_pid(group, reader):
    group[11] = {"network.io.receive": 7, "network.io.transmit": 8, "thread.count": 1}
    group[12] = {"network.io.receive": 7, "network.io.transmit": 8, "thread.count": 2}
    points = points_of(reader)
    assert sorted(points["process.network.io"], key=lambda p: p[1]) == [
        [{"network.io.direction": "receive"}, 7],
        [{"network.io.direction": "transmit"}, 8],
    ]
    assert by_pid(points["process.thread.count"]) == {11: {None: 1}, 12: {None: 2}}
    assert "process.cpu.time" not in points  # what no member's reading has is left out
