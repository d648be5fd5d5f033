"""What the ``alloc`` probe costs, next to tracemalloc (the table in docs/benchmarks.md).

    python benches/alloc_costs.py            # ~20 s
    python benches/alloc_costs.py --rounds 9

Each variant of an allocation loop runs in a child interpreter of its own (installed hooks
never leave a process), interleaved in rounds: no hooks, meterage's hooks installed with no
call probed, tracemalloc, and meterage inside one probed call. Figures are medians over the
rounds of the per-allocation difference to the bare child; the probed call's cost is
measured in this process. See ``meterage.cli.alloc_cost``.
"""

from __future__ import annotations

import argparse

from meterage.cli import alloc_cost, overhead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=1_000_000)
    options = parser.parse_args()
    costs = alloc_cost.measure(rounds=options.rounds, iterations=options.iterations)
    print(overhead.machine_line())
    print()
    print("| what | cost | goal | met |")
    print("|---|---:|---|---|")
    rows = (
        (
            "an allocation while the hooks are installed, outside probed calls",
            "hook_ns",
            "≤ 5 ns",
            5.0,
        ),
        (
            "an allocation inside a probed call (tracked for retained and peak)",
            "tracked_ns",
            "",
            None,
        ),
        ("an allocation under `tracemalloc.start()`", "tracemalloc_ns", "", None),
        (
            "a probed call with `alloc`, over the same call with `cpu` only",
            "probed_call_ns",
            "≤ 100 ns",
            100.0,
        ),
    )
    for what, key, goal, limit in rows:
        met = "" if limit is None else ("yes" if costs[key] <= limit else "**no**")
        print(f"| {what} | {costs[key]:.1f} ns | {goal} | {met} |")
    print()
    print(f"{costs['allocations_per_iteration']:.1f} allocations (each freed) per loop iteration")


if __name__ == "__main__":
    main()
