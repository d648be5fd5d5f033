"""``python -m meterage bench``: what metering a call costs here, next to the alternatives.

Prints, per subject, ns per call, the overhead over a bare call, and that overhead in
multiples of the native floor's (the least a native wrapper doing the same readings
costs) and, for prometheus_client and the OpenTelemetry SDK, of meterage timer-only's;
then the overhead goals with pass/fail. See ``meterage.cli.overhead`` for the method.

``python -m meterage bench module:function`` measures the user's own function instead
(``meterage.cli.user_bench``).
"""

from __future__ import annotations

import argparse
import json
import math
import time

from meterage.cli import alloc_cost, overhead, user_bench

# Options only the built-in stand-ins take (a TARGET run refuses them).
STAND_IN_OPTIONS = {
    "rounds_10us": "--rounds-10us",
    "no_peers": "--no-peers",
    "basic": "--basic",
    "no_alloc": "--no-alloc",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m meterage bench",
        description="Per-call overhead of meterage vs a bare call, the native floor, "
        "prometheus_client and the OpenTelemetry SDK; or, given TARGET, meterage's overhead "
        "on that function.",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=100,
        help="rounds for the trivial function or TARGET (default 100)",
    )
    parser.add_argument(
        "--rounds-10us",
        type=int,
        default=None,
        help="rounds for the ~10 µs function, whose 2%% effect needs more (default 800)",
    )
    parser.add_argument(
        "--batch-ms", type=float, default=2.0, help="length of one timed batch (default 2 ms)"
    )
    parser.add_argument("--no-peers", action="store_true", help="skip prometheus_client and OTel")
    parser.add_argument(
        "--basic", action="store_true", help="only the subjects the goals need (faster)"
    )
    parser.add_argument(
        "--no-alloc", action="store_true", help="skip the alloc probe's per-allocation costs"
    )
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    user_bench.add_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    """Runs the benchmark and prints the table; returns the exit status (0)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.target is not None:
        given = [flag for dest, flag in STAND_IN_OPTIONS.items() if getattr(args, dest)]
        if given:
            parser.error(f"{', '.join(given)}: only for the built-in stand-ins, not with TARGET")
        if args.rounds < 1:
            parser.error(f"--rounds must be at least 1, got {args.rounds}")
        if not (math.isfinite(args.batch_ms) and args.batch_ms > 0):
            parser.error(
                f"--batch-ms must be a positive number of milliseconds, got {args.batch_ms}"
            )
        return user_bench.run(args, argv, parser.error)
    given = [
        "--" + dest.replace("_", "-")
        for dest in user_bench.TARGET_OPTIONS
        if getattr(args, dest) is not None
    ]
    if given:
        parser.error(f"{', '.join(given)}: only with a TARGET (module:function)")
    if args.rounds_10us is None:
        args.rounds_10us = 800
    if args.rounds < 1 or args.rounds_10us < 1:
        parser.error("--rounds and --rounds-10us must be at least 1")
    if not (math.isfinite(args.batch_ms) and args.batch_ms > 0):
        parser.error(f"--batch-ms must be a positive number of milliseconds, got {args.batch_ms}")
    started = time.monotonic()
    subjects = overhead.build_subjects(extended=not args.basic, peers=not args.no_peers)
    results = overhead.measure_all(
        subjects, rounds=args.rounds, rounds_10us=args.rounds_10us, batch_ms=args.batch_ms
    )
    checked = overhead.goals(subjects)
    # Child interpreters of their own (the hooks never leave a process): after the rest.
    alloc = None if args.basic or args.no_alloc else alloc_cost.measure()
    if args.json:
        print(json.dumps({**_as_json(results, checked), "alloc": alloc}, indent=2))
        return 0
    print(f"meterage bench: {overhead.machine_line()}")
    print(
        f"{args.rounds} interleaved rounds ({args.rounds_10us} for the ~10 µs function), "
        f"batches of {args.batch_ms:g} ms; medians of per-round values"
    )
    for line in overhead.format_table(results):
        print(line)
    if not args.no_peers:
        missing = [name for name, ok in overhead.peers_available().items() if not ok]
        if missing:
            print()
        for name in missing:
            print(f"  {name} is not installed: not compared (pip install 'meterage[test]')")
    print("\ngoals")
    for line in overhead.format_goals(results, checked):
        print(line)
    if alloc is not None:
        print(f"\nthe alloc probe ({alloc['rounds']} interleaved rounds, medians)")
        for line in alloc_cost.format_lines(alloc):
            print(line)
    print(f"\n({time.monotonic() - started:.0f} s)")
    return 0


def _as_json(results: overhead.Results, checked: list[overhead.Goal]) -> dict[str, object]:
    subjects = {}
    for key, subject in results.subjects.items():
        entry: dict[str, object] = {"label": subject.label, "ns_per_call": results.per_call(key)}
        if subject.baseline is not None:
            entry["overhead_ns"] = results.overhead(key)
        if subject.baseline is not None and subject.section == overhead.SECTION_10US:
            entry["relative_overhead"] = results.relative_overhead(key)
        if subject.floor is not None and subject.floor in results.samples:
            entry["vs_floor"] = results.ratio(key, subject.floor)
        subjects[key] = entry
    goals = {}
    for goal in checked:
        value, interval, passed = overhead.evaluate(goal, results)
        goals[goal.key] = {
            "text": goal.text,
            "value": value,
            "interval90": list(interval),
            "limit": goal.limit,
            "at_most": goal.at_most,
            "passed": passed,
        }
    return {"machine": overhead.machine_line(), "subjects": subjects, "goals": goals}
