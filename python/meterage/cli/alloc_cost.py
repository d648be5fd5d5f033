"""What the ``alloc`` probe costs: per allocation, in the whole process and inside probed
calls, next to tracemalloc; and per probed call.

The hooks cannot be taken out of a process once in, so each variant of the allocation loop
runs in a child interpreter of its own: without hooks, with meterage's (installed, no call
probed), with tracemalloc, and with meterage's inside one probed call. The children run
interleaved, in rounds; a figure is the median over rounds of the per-allocation
difference to the bare child of the same round. The per-call figure is measured in one
process: a meter with ``cpu`` and one with ``cpu`` and ``alloc``, both probing every call.

>>> from meterage.cli import alloc_cost
>>> costs = alloc_cost.measure(rounds=1, iterations=20_000)
>>> sorted(costs)[:3]
['allocations_per_iteration', 'hook_ns', 'probed_call_ns']
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
import time

#: The allocation loop: a one-item list per iteration is a list object, its item array
#: and (past 256) an int, each allocated and freed.
_CHILD = textwrap.dedent(
    """
    import json, sys, time
    variant, iterations = sys.argv[1], int(sys.argv[2])

    def loop(n):
        for i in range(1000, 1000 + n):
            x = [i]

    if variant == "hooks":
        import meterage
        meterage.meter("alloc_cost.install", probes=("alloc",))
    elif variant == "probed":
        import meterage
        loop = meterage.meter("alloc_cost.loop", probes=("alloc",), sample=1.0)(loop)
    elif variant == "tracemalloc":
        import tracemalloc
        tracemalloc.start()
    loop(iterations)  # warm-up
    best = min(
        (lambda started: (loop(iterations), time.perf_counter() - started)[1])(
            time.perf_counter()
        )
        for _ in range(5)
    )
    allocations = None
    if variant == "probed":
        import meterage
        (series,) = [s for s in meterage.snapshot() if s.operation == "alloc_cost.loop"]
        counted = series.histograms["memory.allocations"]
        allocations = counted.sum / counted.count / iterations
    print(json.dumps({"seconds": best, "allocations_per_iteration": allocations}))
    """
)

VARIANTS = ("bare", "hooks", "tracemalloc", "probed")


def _child(variant: str, iterations: int) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, "-c", _CHILD, variant, str(iterations)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result: dict[str, float] = json.loads(completed.stdout.splitlines()[-1])
    return result


def _probed_call_ns(calls: int = 100_000) -> float:
    """A probed call with ``alloc`` next to the same call with ``cpu`` only, in ns."""
    import meterage

    def empty() -> None:
        pass

    without = meterage.meter("alloc_cost.call.cpu", probes=("cpu",), sample=1.0)(empty)
    with_alloc = meterage.meter("alloc_cost.call.alloc", probes=("cpu", "alloc"), sample=1.0)(empty)

    def timed(function: object) -> float:
        started = time.perf_counter()
        for _ in range(calls):
            function()  # type: ignore[operator]
        return (time.perf_counter() - started) / calls

    differences = []
    for _ in range(7):
        differences.append(timed(with_alloc) - timed(without))
    return statistics.median(differences) * 1e9


def measure(rounds: int = 5, iterations: int = 1_000_000) -> dict[str, float]:
    """Per-allocation costs (ns) of the hooks, of tracking inside a probed call and of
    tracemalloc, the allocations per loop iteration, and the probed call's cost (ns)."""
    per_round: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    allocations = 0.0
    for round_index in range(rounds):
        order = VARIANTS[round_index % 4 :] + VARIANTS[: round_index % 4]
        seconds = {}
        for variant in order:
            result = _child(variant, iterations)
            seconds[variant] = result["seconds"]
            if result["allocations_per_iteration"]:
                allocations = result["allocations_per_iteration"]
        for variant in VARIANTS:
            per_round[variant].append(seconds[variant] - seconds["bare"])
    per_allocation = allocations * iterations or float("nan")

    def median_ns(variant: str) -> float:
        return statistics.median(per_round[variant]) / per_allocation * 1e9

    return {
        "allocations_per_iteration": allocations,
        "hook_ns": median_ns("hooks"),
        "tracked_ns": median_ns("probed"),
        "tracemalloc_ns": median_ns("tracemalloc"),
        "probed_call_ns": _probed_call_ns(),
        "rounds": rounds,
    }


def format_lines(costs: dict[str, float]) -> list[str]:
    """The costs as the bench prints them."""
    return [
        f"  allocation loop: {costs['allocations_per_iteration']:.1f} allocations (and frees) "
        "per iteration, each variant in a child of its own",
        f"  {'meterage hooks installed, outside probed calls':<52}"
        f"{costs['hook_ns']:>7.1f} ns per allocation",
        f"  {'meterage, inside a probed call (tracked)':<52}"
        f"{costs['tracked_ns']:>7.1f} ns per allocation",
        f"  {'tracemalloc.start()':<52}{costs['tracemalloc_ns']:>7.1f} ns per allocation",
        f"  {'a probed call with alloc, vs the same with cpu only':<52}"
        f"{costs['probed_call_ns']:>7.1f} ns per call",
    ]
