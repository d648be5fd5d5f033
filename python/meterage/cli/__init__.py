"""The ``python -m meterage`` command line: ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PROG = "python -m meterage"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each subcommand module adds its own options."""
    from meterage import __version__
    from meterage.cli import demo

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="meterage: what each call costs (wall time, CPU, faults, context "
        "switches, IO), metered per call at production-safe overhead.",
    )
    parser.add_argument("--version", action="version", version=f"meterage {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo.add_arguments(
        commands.add_parser(
            "demo",
            help="run a built-in synthetic workload under meterage and print its cost table",
            description=demo.DESCRIPTION,
        )
    )
    # Listed for --help only: bench owns its arguments, so main() hands them over untouched.
    commands.add_parser(
        "bench",
        help="per-call overhead of meterage next to a bare call and other libraries",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand and returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "bench":
        # Imported only when asked for: the benchmark pulls in optional libraries.
        try:
            import meterage.cli.bench as bench
        except ModuleNotFoundError as error:
            if error.name != "meterage.cli.bench":
                raise
            print(f"{PROG} bench: not available in this installation", file=sys.stderr)
            return 2
        return bench.main(args[1:])
    parser = build_parser()
    options = parser.parse_args(args)
    if options.command is None:
        parser.print_help(sys.stderr)
        return 2
    from meterage.cli import demo

    try:
        return demo.run(options)
    except KeyboardInterrupt:
        return 130
