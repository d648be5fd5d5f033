"""Multiprocess mode (``METERAGE_MULTIPROCESS=1``): one aggregate for a process group.

Joining a group is for good in a process, so each test runs its scenario in a fresh Python
process (``run``), which prints one JSON line with what it saw.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import stat
import subprocess
import sys
import textwrap

import scenario
import servers

PRELUDE = """
import json, os, signal, sys, time
import meterage, meterage.multiprocess as mp

def count(operation, **attributes):
    return sum(
        s.count for s in meterage.snapshot()
        if s.operation == operation and all(s.attributes.get(k) == v for k, v in attributes.items())
    )

def series(operation):
    return [s for s in meterage.snapshot() if s.operation == operation]

def done(**seen):
    print("RESULT " + json.dumps(seen), flush=True)
"""


#: Runs a script after this file's PRELUDE in a fresh interpreter (scenario.run).
run = functools.partial(scenario.run, PRELUDE)


def test_forked_children_are_summed_and_every_member_sees_the_group() -> None:
    seen = run(
        """
        @meterage.meter("mp.work", probes=("cpu", "io"), sample=1.0)
        def work(i):
            return i * 2
        assert [work(i) for i in range(7)] == [i * 2 for i in range(7)]
        children = []
        for k in range(4):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                for i in range(100 + k):
                    assert work(i) == i * 2
                # What this child sees of the group while its siblings may still run.
                os.write(write, str(count("mp.work")).encode())
                os._exit(0)
            os.close(write)
            children.append((pid, read))
        child_views = []
        for pid, read in children:
            child_views.append(int(os.read(read, 64)))
            os.waitpid(pid, 0)
        work(0)
        cpu = [m for m in series("mp.work")[0].histograms if m.startswith("cpu")]
        done(total=count("mp.work"), child_views=child_views, members=mp.members(),
             me=os.getpid(), enabled=mp.is_enabled(), cpu=cpu)
        """
    )
    assert seen["total"] == 7 + 100 + 101 + 102 + 103 + 1
    assert seen["enabled"] is True
    assert seen["members"] == [seen["me"]]  # the children are gone, folded
    # Each child saw at least the parent's 7 and its own calls, at most everything.
    for k, view in enumerate(seen["child_views"]):
        assert 7 + 100 + k <= view <= 7 + 406
    assert seen["cpu"], "probe measures of the children reach the group"


def test_calls_in_flight_count_live_processes_only_and_kill_9_keeps_completed_calls() -> None:
    seen = run(
        """
        import threading
        @meterage.meter("mp.slow", sample=1.0)
        def slow(read_fd):
            os.read(read_fd, 1)  # held until the test writes
        @meterage.meter("mp.quick")
        def quick():
            pass
        from meterage import _native  # calls in flight are counted once an exporter asks
        _native.set_active_tracking(True)
        hold_read, hold_write = os.pipe()
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            for _ in range(25):
                quick()
            os.write(ready_write, b"x")
            slow(hold_read)  # in flight until killed
            os._exit(0)
        os.read(ready_read, 1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = series("mp.slow")
            if found and found[0].active == 1:
                break
            time.sleep(0.01)
        active_before = [s.active for s in series("mp.slow")]
        quick_before = count("mp.quick")
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        active_after = [s.active for s in series("mp.slow")]
        done(active_before=active_before, active_after=active_after,
             quick_before=quick_before, quick_after=count("mp.quick"),
             slow_after=count("mp.slow"))
        """
    )
    assert seen["active_before"] == [1]
    assert seen["quick_before"] == seen["quick_after"] == 25
    # The killed call never completed: not counted, and no longer in flight.
    assert seen["slow_after"] == 0
    assert seen["active_after"] in ([], [0])


def test_killing_processes_at_any_instruction_never_corrupts_or_blocks_the_group() -> None:
    seen = run(
        """
        import random
        rng = random.Random(11)
        @meterage.meter("mp.churn", probes=("cpu",), sample=1.0)
        def churn(i):
            return i
        hist = meterage.histogram("mp.values", unit="By")
        finished = 0  # calls of children that exited on their own, told by pipe
        seen_totals = []
        live = []
        for round_ in range(60):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                n = 0
                # New series too: a kill may land mid-way through making one.
                while n < 400:
                    churn(n)
                    hist.record(float(n), {"shard": str(n % 37)})
                    n += 1
                os.write(write, str(n).encode())
                os._exit(0)
            os.close(write)
            live.append((pid, read, rng.random() < 0.5))
            if len(live) >= 3:
                pid, read, kill = live.pop(0)
                if kill:
                    time.sleep(rng.random() * 0.004)
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                told = os.read(read, 64)
                finished += int(told or 0)
                os.close(read)
            seen_totals.append(count("mp.churn"))
        for pid, read, _ in live:
            os.waitpid(pid, 0)
            finished += int(os.read(read, 64) or 0)
        total = count("mp.churn")
        values = sum(s.count for s in meterage.snapshot() if s.operation == "mp.values")
        # The group still works after all that.
        churn(1)
        done(totals=seen_totals, total=total, finished=finished, values=values,
             after=count("mp.churn"))
        """,
        timeout=110,
    )
    totals = seen["totals"]
    assert totals == sorted(totals), "a scrape went backwards"
    # Every call of a child that exited on its own is there; killed ones add what they
    # completed (at most their 400).
    assert seen["finished"] <= seen["total"] <= 60 * 400
    assert seen["after"] == seen["total"] + 1
    assert seen["values"] >= seen["finished"]


def test_a_thousand_restarts_leave_the_footprint_bounded() -> None:
    seen = run(
        """
        @meterage.meter("mp.restart", probes=("cpu",), sample=1.0)
        def handle(route):
            return route
        def footprint():
            info = mp.group()
            return os.stat(info.path).st_blocks * 512
        def restart(times):
            for _ in range(times):
                pid = os.fork()
                if pid == 0:
                    for r in range(20):
                        handle(r)  # attribute-free series, and 20 routes below
                        meterage.counter("mp.routes").add(1, {"route": f"/r{r}"})
                    os._exit(0)
                os.waitpid(pid, 0)
            meterage.snapshot()  # a scrape folds the exited
        restart(1)
        after_one = footprint()
        restart(999)
        after_thousand = footprint()
        routes = [s for s in meterage.snapshot() if s.operation == "mp.routes"]
        done(after_one=after_one, after_thousand=after_thousand, calls=count("mp.restart"),
             routes=len(routes), adds=sum(s.value for s in routes))
        """,
        timeout=110,
    )
    assert seen["calls"] == 1000 * 20
    assert seen["routes"] == 20
    assert seen["adds"] == 1000 * 20
    assert seen["after_thousand"] <= 1.1 * seen["after_one"], seen


def test_custom_instruments_and_dynamic_attributes_are_summed() -> None:
    seen = run(
        """
        hist = meterage.histogram("mp.size", unit="By")
        bound = hist.bind({"kind": "bound"})
        total = meterage.counter("mp.total")
        @meterage.meter("mp.fail")
        def fail(kind):
            raise KeyError(kind)
        pids = []
        for k in range(3):
            pid = os.fork()
            if pid == 0:
                for i in range(10):
                    hist.record(100.0, {"kind": "plain"})
                    bound.record(1.0)
                    total.add(2.5)
                    try:
                        fail(i)
                    except KeyError:
                        pass
                    with meterage.meter("mp.block") as call:
                        call.set_attribute("worker", k)
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
        snap = meterage.snapshot()
        plain = [s for s in snap if s.operation == "mp.size" and s.attributes == {"kind": "plain"}]
        counter = [s for s in snap if s.operation == "mp.total"]
        done(plain=plain[0].count, plain_sum=next(iter(plain[0].histograms.values())).sum,
             bound=count("mp.size", kind="bound"), counter=counter[0].value,
             failed=count("mp.fail", **{"error.type": "KeyError"}),
             blocks=sorted((s.attributes["worker"], s.count) for s in series("mp.block")))
        """
    )
    assert seen["plain"] == 30 and seen["plain_sum"] == 3000.0
    assert seen["bound"] == 30
    assert seen["counter"] == 75.0
    assert seen["failed"] == 30
    assert seen["blocks"] == [[0, 10], [1, 10], [2, 10]]


def test_a_histograms_boundaries_reach_a_process_that_never_made_it() -> None:
    # The reading process never makes the histogram: it learns its boundaries from the
    # live members' directories and from the folded totals of one that exited, as it does
    # its unit. A member that made it without boundaries is summed in and exported with
    # the group's.
    seen = run(
        """
        import bisect
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        import meterage.otel

        waits = meterage.BOUNDARIES["queue.wait"]
        values = [0.005, 0.0051, 0.0049, 60.0, 60.01, 3600.0, 3600.5]

        def child(boundaries, queue, hold):
            ready_read, ready_write = os.pipe()
            pid = os.fork()
            if pid == 0:
                waited = meterage.histogram("mp.wait", unit="s", boundaries=boundaries)
                for value in values:
                    waited.record(value, {"queue": queue})
                os.write(ready_write, b"x")
                if hold is not None:
                    os.read(hold, 1)  # alive until the parent has read the group
                os._exit(0)
            os.read(ready_read, 1)
            return pid

        hold_read, hold_write = os.pipe()
        gone = child(waits, "gone", None)
        os.waitpid(gone, 0)
        live = [child(waits, "live", hold_read), child(None, "plain", hold_read)]

        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        meterage.otel.attach(provider, process=False, spans=False, host=False)

        def exported():
            data = reader.get_metrics_data()
            return {
                point.attributes["queue"]: (list(point.explicit_bounds), list(point.bucket_counts))
                for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                if m.name == "mp.wait" for point in m.data.data_points
            }

        while_live = exported()
        os.write(hold_write, b"xx")
        for pid in live:
            os.waitpid(pid, 0)
        all_gone = exported()
        expected = [0] * (len(waits) + 1)
        for value in values:
            expected[bisect.bisect_left(waits, value)] += 1
        units = {s.unit for s in meterage.snapshot() if s.operation == "mp.wait"}
        meterage.otel.detach(provider)
        done(while_live=while_live, all_gone=all_gone, waits=list(waits), expected=expected,
             units=sorted(units))
        """
    )
    for exported in (seen["while_live"], seen["all_gone"]):
        assert sorted(exported) == ["gone", "live", "plain"]
        for bounds, counts in exported.values():
            assert bounds == seen["waits"]
            assert counts == seen["expected"]
    assert seen["units"] == ["s"]


def test_multiprocessing_pool_fork_and_spawn() -> None:
    seen = run(
        """
        import multiprocessing
        import mp_pool_work
        counts = {}
        for method in ("fork", "spawn"):
            with multiprocessing.get_context(method).Pool(4) as pool:
                assert pool.map(mp_pool_work.square, range(200)) == [i * i for i in range(200)]
            counts[method] = count("mp.pool.square")
        done(counts=counts)
        """,
        env={"PYTHONPATH": str(pathlib.Path(__file__).parent / "multiprocess_apps")},
    )
    assert seen["counts"] == {"fork": 200, "spawn": 400}


def test_the_shared_state_is_the_users_only_and_a_crashed_groups_is_not_joined() -> None:
    first = run(
        """
        info = mp.group()
        st = os.stat(info.path)
        @meterage.meter("mp.stale")
        def f():
            pass
        f()
        done(path=info.path, mode=st.st_mode, uid=st.st_uid, root=info.root_pid, pid=os.getpid())
        """
    )
    assert stat.S_IMODE(first["mode"]) == 0o600
    assert first["uid"] == os.getuid()
    assert first["root"] == first["pid"]
    # That process is gone: a new service (a new root) neither joins nor sees its group,
    # and sweeps its file away.
    second = run(
        """
        f = meterage.meter("mp.stale")(lambda: None)
        done(path=mp.group().path, stale=count("mp.stale"))
        """
    )
    assert second["path"] != first["path"]
    assert second["stale"] == 0
    assert not os.path.exists(first["path"])


def test_two_services_never_see_each_others_numbers() -> None:
    # Two roots at once: each sees its own calls only.
    service = """
        import sys
        name = sys.argv[1] if len(sys.argv) > 1 else "x"
        op = meterage.meter("mp.service")
        for _ in range(int(os.environ["CALLS"])):
            with op:
                pass
        time.sleep(0.5)  # both alive at once
        done(calls=count("mp.service"), path=mp.group().path)
    """
    environ = scenario.clean_environment(multiprocess=True)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PRELUDE + textwrap.dedent(service)],
            env={**environ, "CALLS": str(calls)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for calls in (3, 5)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    assert [r["calls"] for r in results] == [3, 5]
    assert results[0]["path"] != results[1]["path"]


def test_misuse_is_refused_clearly() -> None:
    seen = run(
        """
        errors = {}
        try:
            meterage.reset()
        except RuntimeError as error:
            errors["reset"] = str(error)
        done(**errors)
        """
    )
    assert "multiprocess" in seen["reset"]
    late = run(
        """
        with meterage.meter("mp.early"):
            pass
        try:
            mp.enable()
        except RuntimeError as error:
            done(late=str(error), enabled=mp.is_enabled(), count=count("mp.early"))
        """,
        multiprocess=False,
    )
    assert "before the first metered call" in late["late"]
    assert late["enabled"] is False and late["count"] == 1
    bad = subprocess.run(
        [sys.executable, "-c", "import meterage"],
        env={**os.environ, "METERAGE_MULTIPROCESS": "maybe"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0
    assert "METERAGE_MULTIPROCESS='maybe'" in bad.stderr and "expected 1" in bad.stderr


def test_enable_in_code_before_any_call_and_children_of_threads_and_closerange() -> None:
    seen = run(
        """
        info = mp.enable()
        assert mp.enable() == info  # idempotent
        import threading
        stop = threading.Event()
        def busy(k):
            # New series all the time: a fork may land while one is being made.
            i = 0
            while not stop.is_set():
                with meterage.meter("mp.threads", attributes={"t": k, "i": i % 500}):
                    pass
                i += 1
        threads = [threading.Thread(target=busy, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        pids = []
        for _ in range(20):
            pid = os.fork()
            if pid == 0:
                os.closerange(3, 4096)
                log = open(os.devnull, "w")  # reuses a low descriptor
                for _ in range(50):
                    with meterage.meter("mp.child"):
                        log.write("x")
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            assert status == 0, status
        stop.set()
        for t in threads:
            t.join()
        done(child=count("mp.child"))
        """,
        multiprocess=False,
    )
    assert seen["child"] == 20 * 50


def test_a_fork_from_c_without_pythons_fork_hooks_never_touches_the_parents_numbers() -> None:
    # libc's fork() runs the atfork handlers but not Python's os.register_at_fork hooks
    # (as a C extension's fork would): the child cannot join, and what it records into the
    # series it inherited must stay its own.
    seen = run(
        """
        import ctypes
        @meterage.meter("mp.cfork", probes=("cpu",), sample=1.0)
        def work():
            pass
        hist = meterage.histogram("mp.cfork.values")
        for _ in range(10):
            work()
            hist.record(1.0)
        pid = ctypes.CDLL(None).fork()
        if pid == 0:
            for _ in range(100):
                work()
                hist.record(1.0, {"new": "series"})
                hist.record(2.0)
            os._exit(0)
        os.waitpid(pid, 0)
        for _ in range(5):
            work()
        done(calls=count("mp.cfork"), values=count("mp.cfork.values"))
        """
    )
    assert seen == {"calls": 15, "values": 10}


def test_a_reader_killed_while_it_holds_the_groups_lock_blocks_no_one() -> None:
    seen = run(
        """
        import random
        rng = random.Random(5)
        @meterage.meter("mp.locked")
        def work():
            pass
        for _ in range(50):
            work()
        kills = 0
        for _ in range(40):
            pid = os.fork()
            if pid == 0:
                while True:  # reads (and folds) under the lock until killed
                    meterage.snapshot()
            time.sleep(rng.random() * 0.01)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            kills += 1
        work()
        done(calls=count("mp.locked"), kills=kills, members=len(mp.members()))
        """
    )
    assert seen == {"calls": 51, "kills": 40, "members": 1}


def test_a_live_members_traced_calls_carry_their_exemplars_to_the_group() -> None:
    seen = run(
        """
        import meterage.otel
        from opentelemetry.sdk.trace import TracerProvider
        provider = TracerProvider()
        assert meterage.otel.span_attributes(provider) is True
        tracer = provider.get_tracer("mp")
        work = meterage.meter("mp.traced", probes=())(lambda: None)
        read, write = os.pipe()
        hold_read, hold_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            with tracer.start_as_current_span("child") as span:
                work()
                context = span.get_span_context()
            os.write(write, f"{context.trace_id} {context.span_id}".encode())
            os.read(hold_read, 1)  # alive until the parent has read the group
            os._exit(0)
        trace_id, span_id = map(int, os.read(read, 100).split())
        (series,) = series("mp.traced")
        exemplars = [(e[2], e[3]) for e in series.exemplars]
        os.write(hold_write, b"x")
        os.waitpid(pid, 0)
        done(exemplars=exemplars, expected=[trace_id, span_id], count=series.count)
        """
    )
    assert seen["count"] == 1
    assert seen["exemplars"] == [seen["expected"]]


def test_a_child_reads_and_folds_its_parents_numbers_as_they_are_not_as_they_were() -> None:
    # A fork child holds a private copy of its parent's arena (the series it inherited);
    # reading the group, it must still see the parent's numbers as they are in the shared
    # memory, and folding the parent once it is gone must keep them all.
    seen = run(
        """
        work = meterage.meter("mp.parent.work")(lambda: None)
        go_read, go_write = os.pipe()
        out_read, out_write = os.pipe()
        done_read, done_write = os.pipe()
        forked_read, forked_write = os.pipe()
        worker = os.fork()
        if worker == 0:
            for _ in range(1000):
                work()
            if os.fork() == 0:  # a helper the worker starts, which outlives it
                os.write(forked_write, b"h")  # forked (its copy of the worker's arena made)
                os.read(go_read, 1)
                os.write(out_write, f"{count('mp.parent.work')} {count('mp.parent.new')}".encode())
                os._exit(0)
            assert os.read(forked_read, 1) == b"h"
            for _ in range(500):
                work()  # after the fork: the child's copy does not have these
            with meterage.meter("mp.parent.new"):
                pass  # a series made after the fork
            os.write(done_write, b"x")
            os._exit(0)
        os.read(done_read, 1)
        alive = (count("mp.parent.work"), count("mp.parent.new"))
        os.waitpid(worker, 0)
        os.write(go_write, b"x")  # the helper reads (and folds) the gone worker
        helper = tuple(map(int, os.read(out_read, 100).split()))
        done(alive=alive, helper=helper, after=(count("mp.parent.work"), count("mp.parent.new")))
        """
    )
    assert seen == {"alive": [1500, 1], "helper": [1500, 1], "after": [1500, 1]}


def test_a_child_never_takes_a_slot_whose_arena_it_holds_a_copy_of() -> None:
    # A forks W and exits; its slot is freed. W's fork child G holds a private copy of A's
    # arena (inherited through W): it must take another slot, or its calls would stay in
    # its copy and never reach the group.
    seen = run(
        """
        work = meterage.meter("mp.shadow")(lambda: None)
        out_read, out_write = os.pipe()
        a = os.fork()
        if a == 0:
            for _ in range(3):
                work()
            w = os.fork()
            if w == 0:
                while os.getppid() == a:  # until A is gone
                    time.sleep(0.01)
                meterage.snapshot()  # folds A: its slot is free again
                g = os.fork()
                if g == 0:
                    for _ in range(5):
                        work()
                    os._exit(0)
                os.waitpid(g, 0)
                os.write(out_write, str(count("mp.shadow")).encode())
                os._exit(0)
            os._exit(0)
        os.waitpid(a, 0)
        seen_by_w = int(os.read(out_read, 100))
        done(seen_by_w=seen_by_w, total=count("mp.shadow"))
        """
    )
    assert seen == {"seen_by_w": 8, "total": 8}


def test_a_group_whose_root_was_killed_lives_on_while_a_member_does() -> None:
    # The root is killed -9 and a worker outlives it; a new service on the machine must not
    # sweep the worker's group away, and does once the worker is gone (leases included).
    orphaned = """
import os, signal, sys
import meterage, meterage.multiprocess as mp
work = meterage.meter("mp.orphan")(lambda: None)
read, write = os.pipe()
if os.fork() == 0:
    for _ in range(10):
        work()
    open(mp.group().path + ".prometheus-1", "w").close()  # as an exporter's lease
    print(mp.group().path, flush=True)
    sys.stdin.readline()  # the new service has started
    for _ in range(10):
        work()
    print(sum(s.count for s in meterage.snapshot() if s.operation == "mp.orphan"), flush=True)
    sys.stdin.readline()
    os._exit(0)
os.kill(os.getpid(), signal.SIGKILL)
"""
    worker = subprocess.Popen(
        [sys.executable, "-c", orphaned],
        env=scenario.clean_environment(multiprocess=True),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout is not None and worker.stdin is not None
    path = worker.stdout.readline().strip()
    new_service = "import meterage.multiprocess as mp; done(path=mp.group().path)"
    assert run(new_service)["path"] != path
    assert os.path.exists(path) and os.path.exists(path + ".prometheus-1")
    worker.stdin.write("\n")
    worker.stdin.flush()
    assert int(worker.stdout.readline()) == 20
    worker.stdin.write("\n")
    worker.stdin.close()
    worker.wait(timeout=30)
    worker.stdout.close()
    run(new_service)
    assert not os.path.exists(path) and not os.path.exists(path + ".prometheus-1")


def test_a_worker_that_outlived_its_root_starts_helpers_into_its_group() -> None:
    # The root exits; its worker lives on and starts a helper with multiprocessing's spawn,
    # which follows METERAGE_GROUP although the group's root is gone.
    orphaned = """
import multiprocessing, os, sys, time
import meterage, mp_pool_work
if __name__ == "__main__":
    if os.fork() == 0:
        while os.getppid() != 1 and os.path.exists(f"/proc/{os.getppid()}/stat") and \\
                open(f"/proc/{os.getppid()}/stat").read().split(")")[-1].split()[0] != "Z":
            time.sleep(0.01)  # until the root has exited
        mp_pool_work.ten_calls()
        helper = multiprocessing.get_context("spawn").Process(target=mp_pool_work.ten_calls)
        helper.start()
        helper.join()
        print(sum(s.count for s in meterage.snapshot() if s.operation == "mp.pool.square"))
        sys.stdout.flush()
        os._exit(0)
"""
    environ = scenario.clean_environment(multiprocess=True)
    environ["PYTHONPATH"] = str(pathlib.Path(__file__).parent / "multiprocess_apps")
    root = subprocess.Popen(
        [sys.executable, "-c", orphaned], env=environ, stdout=subprocess.PIPE, text=True
    )
    out, _ = root.communicate(timeout=60)
    assert out.split() == ["20"]


def test_the_process_that_takes_the_port_serves_the_groups_numbers_from_its_first_page() -> None:
    # A worker booting while the port is free (its holder was just killed) took the port
    # before meterage was attached to its provider, and for that window served pages without
    # the group's series: a scrape read the group's counters as gone (found in CI).
    port = servers.free_port()
    seen = run(
        f"""
        import threading, urllib.request
        import meterage.otel
        from prometheus_client.parser import text_string_to_metric_families

        work = meterage.meter("mp.first.page")(lambda: None)
        for _ in range(7):
            work()

        def counts():
            try:
                page = urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=2).read()
            except OSError:
                return None  # not served yet
            return sum(
                sample.value
                for family in text_string_to_metric_families(page.decode())
                for sample in family.samples
                if sample.name == "meterage_call_duration_seconds_count"
                and sample.labels.get("meterage_operation") == "mp.first.page"
            )

        attach = meterage.otel._attach_to
        def slow_attach(*args, **kwargs):  # a worker still importing its application
            time.sleep(1.0)
            attach(*args, **kwargs)
        meterage.otel._attach_to = slow_attach

        pages, configured = [], threading.Event()
        def scrape():
            while not configured.is_set():
                pages.append(counts())
                time.sleep(0.02)
        scraper = threading.Thread(target=scrape)
        scraper.start()
        meterage.otel.configure(process=False)
        configured.set()
        scraper.join()
        done(served=sorted({{page for page in pages if page is not None}}), last=counts())
        """,
        env={"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT": str(port)},
    )
    assert seen["last"] == 7.0
    assert set(seen["served"]) <= {7.0}, f"pages served before meterage was attached: {seen}"


def test_a_pushing_reader_of_an_attached_provider_pushes_the_group_once() -> None:
    # opentelemetry-instrument's configurator (or an application's own provider) pushes
    # OTLP from every process: the group's series must go out from one of them only.
    seen = run(
        """
        import meterage.otel
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import (
            MetricExporter, MetricExportResult, PeriodicExportingMetricReader,
        )

        class Counting(MetricExporter):
            def __init__(self, write):
                super().__init__()
                self.write = write
            def export(self, data, timeout_millis=10_000, **kwargs):
                calls = sum(
                    point.count
                    for resource in data.resource_metrics
                    for scope in resource.scope_metrics
                    for metric in scope.metrics
                    if metric.name == "meterage.call.duration"
                    for point in metric.data.data_points
                    if point.attributes.get("meterage.operation") == "mp.push"
                )
                os.write(self.write, f"{os.getpid()} {calls}\\n".encode())
                return MetricExportResult.SUCCESS
            def force_flush(self, timeout_millis=10_000):
                return True
            def shutdown(self, timeout_millis=30_000, **kwargs):
                pass

        work = meterage.meter("mp.push")(lambda: None)
        pushes_read, pushes_write = os.pipe()
        ready_read, ready_write = os.pipe()
        go_read, go_write = os.pipe()

        def push_from_here():
            reader = PeriodicExportingMetricReader(
                Counting(pushes_write), export_interval_millis=10**9
            )
            provider = MeterProvider(metric_readers=[reader])
            meterage.otel.attach(provider, process=False, spans=False)
            return provider

        child = os.fork()
        if child == 0:
            for _ in range(5):
                work()
            os.write(ready_write, b"x")
            os.read(go_read, 1)  # after the parent has pushed
            provider = push_from_here()
            provider.force_flush()
            os._exit(0)
        os.read(ready_read, 1)
        for _ in range(5):
            work()
        provider = push_from_here()
        provider.force_flush()  # the first to push holds the lease
        os.write(go_write, b"x")
        os.waitpid(child, 0)
        os.close(pushes_write)
        lines = b""
        while chunk := os.read(pushes_read, 4096):
            lines += chunk
        pushes = {int(pid): int(calls) for pid, calls in (l.split() for l in lines.splitlines())}
        done(parent=pushes.get(os.getpid()), child=pushes.get(child), processes=len(pushes))
        """
    )
    # Both processes pushed; only the lease holder carried the group's 10 calls.
    assert seen == {"parent": 10, "child": 0, "processes": 2}
