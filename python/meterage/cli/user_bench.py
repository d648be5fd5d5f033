"""``python -m meterage bench TARGET``: meterage's overhead on the user's own function.

``TARGET`` is ``module:function`` or ``path/to/file.py:function`` (``function`` may be
dotted: ``module:Class.method`` for a static method). The measuring is
``meterage.overhead.measure``. With ``--max-overhead`` the command is a CI gate: exit 1
when the chosen mode's overhead is above the limit in every one of ``--attempts``
measurements, each after the first in a fresh process (as ``benches/check_overhead.py``
does: one process can run a wrapper consistently slower than the next, which more rounds
in the same process would not average out).

The call's arguments come from ``--args``/``--kwargs`` (JSON), or from ``--call``: a call
of ``function`` written in Python, its arguments evaluated once in the namespace that
``--setup`` code built, e.g. ``--setup 'data = list(range(100))' --call 'function(data)'``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meterage import overhead

TARGET_OPTIONS = (
    "args",
    "kwargs",
    "call",
    "setup",
    "probes",
    "sample",
    "modes",
    "max_overhead",
    "mode",
    "attempts",
)
"""Options (argparse dests) that only a TARGET run takes; all default to None."""

_UNITS_NS = {"ns": 1.0, "us": 1e3, "µs": 1e3, "ms": 1e6, "s": 1e9}
_LIMIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%|ns|us|µs|ms|s)?\s*$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The TARGET positional and the options only a TARGET run takes."""
    parser.add_argument(
        "target",
        nargs="?",
        metavar="TARGET",
        help="module:function or path/to/file.py:function: measure meterage's overhead on "
        "that function instead of the built-in stand-ins (see docs/ci.md)",
    )
    group = parser.add_argument_group("TARGET options")
    group.add_argument("--args", metavar="JSON", help="positional arguments, a JSON array")
    group.add_argument("--kwargs", metavar="JSON", help="keyword arguments, a JSON object")
    group.add_argument(
        "--setup",
        metavar="CODE",
        help="Python code run once first; its names can be used in --call",
    )
    group.add_argument(
        "--call",
        metavar="EXPR",
        help="the call to time, written as function(...): e.g. 'function(data, n=3)'; its "
        "arguments are evaluated once, after --setup (instead of --args/--kwargs)",
    )
    group.add_argument(
        "--probes",
        metavar="NAMES",
        help="comma-separated probes for the default and full modes (default: cpu,rusage,io)",
    )
    group.add_argument(
        "--sample", type=float, metavar="P", help="fixed probing rate of the default mode"
    )
    group.add_argument(
        "--modes",
        metavar="MODES",
        help=f"comma-separated modes to measure (default: {','.join(overhead.MODES)})",
    )
    group.add_argument(
        "--max-overhead",
        metavar="LIMIT",
        help="fail (exit 1) when --mode's overhead is above LIMIT in every attempt: "
        "relative (2%%, 0.02) or per call (500ns, 1us)",
    )
    group.add_argument(
        "--mode",
        metavar="MODE",
        help="the mode --max-overhead applies to (default: default, or the only one measured)",
    )
    group.add_argument(
        "--attempts",
        type=int,
        metavar="N",
        help="measurements, each in a fresh process, before --max-overhead fails (default 3)",
    )
    group.add_argument("--attempt", type=int, default=1, help=argparse.SUPPRESS)


@dataclass(frozen=True)
class Limit:
    """An overhead limit: relative (a fraction of the bare call) or absolute (ns per call)."""

    text: str
    value: float
    relative: bool

    def value_of(self, measured: overhead.ModeOverhead) -> float:
        """The measured figure this limit is compared with."""
        return measured.relative if self.relative else measured.overhead_ns

    def describe(self, value: float) -> str:
        return f"{value * 100:+.2f}%" if self.relative else f"{value:+,.1f} ns"

    def limit_text(self) -> str:
        """The limit as it was given."""
        return self.text.strip()


def parse_limit(text: str) -> Limit:
    """``2%`` and ``0.02`` are relative (2% of the bare call); ``500ns``, ``1us``, ``1µs``,
    ``2ms``, ``1s`` are per call. Raises ValueError saying what is accepted.

    >>> parse_limit("2%")
    Limit(text='2%', value=0.02, relative=True)
    >>> parse_limit("1us").value, parse_limit("1us").relative
    (1000.0, False)
    """
    match = _LIMIT.match(text)
    if match is None:
        raise ValueError(
            f"--max-overhead: cannot read {text!r}; give a share of the bare call "
            "(2%, 0.02) or a time per call (500ns, 1us, 2ms)"
        )
    number, unit = float(match.group(1)), match.group(2)
    if not math.isfinite(number):
        raise ValueError(f"--max-overhead must be finite, got {text!r}")
    if unit is None:
        return Limit(text, number, relative=True)
    if unit == "%":
        return Limit(text, number / 100, relative=True)
    return Limit(text, number * _UNITS_NS[unit], relative=False)


def load_target(text: str) -> Callable[..., Any]:
    """Imports ``module:function`` or ``path/to/file.py:function``. Raises ValueError."""
    where, colon, attribute = text.rpartition(":")
    if not colon or not where or not attribute:
        raise ValueError(
            f"TARGET must be module:function or path/to/file.py:function, got {text!r}"
        )
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"TARGET {text!r}: no such file {where!r}")
        name = re.sub(r"\W", "_", path.stem)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"TARGET {text!r}: cannot load {where!r} as a Python module")
        module = importlib.util.module_from_spec(spec)
        # As when the file is run as a script: its own folder comes first on the path.
        sys.path.insert(0, str(path.resolve().parent))
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            raise ValueError(
                f"TARGET {text!r}: importing {where!r} raised {type(error).__name__}: {error}"
            ) from error
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(where)
        except Exception as error:
            raise ValueError(
                f"TARGET {text!r}: cannot import module {where!r}: {type(error).__name__}: {error}"
            ) from error
    found: Any = module
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ValueError(f"TARGET {text!r}: {where!r} has no attribute {attribute!r}") from None
    if not callable(found):
        raise ValueError(
            f"TARGET {text!r}: {attribute!r} is a {type(found).__name__}, not callable"
        )
    return found  # type: ignore[no-any-return]


def _capture(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def call_arguments(call: str, namespace: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of ``function(...)`` in ``call``, evaluated in ``namespace``."""
    try:
        tree = ast.parse(call.strip(), mode="eval")
    except SyntaxError as error:
        raise ValueError(f"--call: not a Python expression ({error.msg}): {call!r}") from None
    body = tree.body
    if not (isinstance(body, ast.Call) and isinstance(body.func, ast.Name)):
        raise ValueError(f"--call must be a call written function(...), got {call!r}")
    if body.func.id != "function":
        raise ValueError(
            f"--call must call the name function (the TARGET), e.g. 'function(data)'; "
            f"got a call of {body.func.id!r}"
        )
    body.func = ast.copy_location(ast.Name(id="__meterage_capture__", ctx=ast.Load()), body.func)
    code = compile(ast.fix_missing_locations(tree), "<--call>", "eval")
    try:
        found: tuple[tuple[Any, ...], dict[str, Any]] = eval(
            code, {**namespace, "__meterage_capture__": _capture}
        )
    except Exception as error:
        raise ValueError(
            f"--call: evaluating its arguments raised {type(error).__name__}: {error}"
        ) from error
    return found


def _json_option(name: str, text: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{name}: not valid JSON ({error.msg}): {text!r}") from None
    if not isinstance(value, kind):
        what = "array" if kind is list else "object"
        raise ValueError(f"{name} must be a JSON {what}, got {text!r}")
    return value


@dataclass(frozen=True)
class Plan:
    """What a TARGET run measures, read from the options."""

    function: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    modes: tuple[str, ...]
    probes: tuple[str, ...] | None
    limit: Limit | None
    mode: str | None
    attempts: int


def plan(args: argparse.Namespace) -> Plan:
    """Checks the options and builds the call. Raises ValueError with the message to print."""
    if args.call is not None and (args.args is not None or args.kwargs is not None):
        raise ValueError("--call gives the call's arguments: use it or --args/--kwargs, not both")
    modes = overhead.MODES
    if args.modes is not None:
        modes = tuple(part.strip() for part in args.modes.split(",") if part.strip())
        unknown = [mode for mode in modes if mode not in overhead.MODES]
        if not modes or unknown:
            raise ValueError(
                f"--modes: unknown or no mode in {args.modes!r}; choose from "
                f"{', '.join(overhead.MODES)}"
            )
    limit = None if args.max_overhead is None else parse_limit(args.max_overhead)
    mode = args.mode
    if mode is not None and mode not in overhead.MODES:
        raise ValueError(f"--mode: unknown mode {mode!r}; choose from {', '.join(overhead.MODES)}")
    if mode is not None and limit is None:
        raise ValueError("--mode says which mode --max-overhead applies to: give --max-overhead")
    if limit is not None and mode is None:
        mode = "default" if "default" in modes or len(modes) > 1 else modes[0]
    if mode is not None and mode not in modes:
        raise ValueError(f"--mode {mode} is not among --modes {','.join(modes)}")
    attempts = 3 if args.attempts is None else args.attempts
    if attempts < 1:
        raise ValueError(f"--attempts must be at least 1, got {attempts}")
    if args.attempts is not None and limit is None:
        raise ValueError("--attempts is the number of measurements --max-overhead makes: give it")
    probes = None
    if args.probes is not None:
        probes = tuple(part.strip() for part in args.probes.split(",") if part.strip())

    function = load_target(args.target)
    namespace: dict[str, Any] = {"__name__": "__meterage_setup__", "function": function}
    if args.setup is not None:
        try:
            exec(compile(args.setup, "<--setup>", "exec"), namespace)
        except Exception as error:
            raise ValueError(f"--setup raised {type(error).__name__}: {error}") from error
    if args.call is not None:
        positional, keywords = call_arguments(args.call, namespace)
    else:
        positional = tuple(_json_option("--args", args.args, list)) if args.args else ()
        keywords = _json_option("--kwargs", args.kwargs, dict) if args.kwargs else {}
    return Plan(function, positional, keywords, modes, probes, limit, mode, attempts)


def _fresh_attempt(argv: Sequence[str], attempt: int, as_json: bool) -> tuple[int, Any]:
    """Runs the same command again in a new interpreter, as attempt ``attempt`` with no
    further attempts of its own; returns its exit status and (``--json``) its document."""
    command = [
        sys.executable,
        "-m",
        "meterage",
        "bench",
        *argv,
        "--attempts=1",
        f"--attempt={attempt}",
    ]
    sys.stdout.flush()
    if not as_json:
        return subprocess.run(command, check=False).returncode, None
    done = subprocess.run(command, check=False, stdout=subprocess.PIPE, text=True)
    try:
        return done.returncode, json.loads(done.stdout)
    except json.JSONDecodeError:
        return done.returncode, None


def run(args: argparse.Namespace, argv: Sequence[str], error: Callable[[str], Any]) -> int:
    """A TARGET run: measures, prints, and with --max-overhead re-measures a miss in fresh
    processes; 0 when within the limit (or no limit), 1 when above it in every attempt.
    ``error`` reports a bad argument (argparse's ``parser.error``, exit 2)."""
    try:
        chosen = plan(args)
        result = overhead.measure(
            chosen.function,
            args=chosen.args,
            kwargs=chosen.kwargs,
            modes=chosen.modes,
            probes=chosen.probes,
            sample=args.sample,
            rounds=args.rounds,
            batch_ms=args.batch_ms,
        )
    except (ValueError, TypeError, RuntimeError) as problem:
        error(str(problem))
        return 2  # error() exits; for a caller's error() that returns
    limit, mode = chosen.limit, chosen.mode
    document: dict[str, Any] = result.to_dict()
    if not args.json:
        print(result.format_table())
    if limit is None or mode is None:
        if args.json:
            print(json.dumps(document, indent=2))
        return 0

    value = limit.value_of(result[mode])
    passed = value <= limit.value
    attempt = args.attempt
    verdicts = [{"attempt": attempt, "value": value, "passed": passed}]
    if not args.json:
        verdict = "pass" if passed else "ABOVE"
        print(
            f"\n{mode} mode overhead {limit.describe(value)} vs --max-overhead "
            f"{limit.limit_text()} (attempt {attempt}): {verdict}"
        )
    while not passed and attempt < chosen.attempts:
        attempt += 1
        if not args.json:
            print(f"above the limit: measuring again in a fresh process (attempt {attempt})")
        status, child = _fresh_attempt(argv, attempt, args.json)
        if status not in (0, 1):
            print(f"attempt {attempt} could not measure (exit {status})", file=sys.stderr)
            return 2
        passed = status == 0
        entry: dict[str, Any] = {"attempt": attempt, "passed": passed}
        if isinstance(child, dict):
            child_check = child.pop("check", {})
            entry["value"] = child_check.get("attempts", [{}])[0].get("value")
            entry["result"] = child
        verdicts.append(entry)
    document["check"] = {
        "mode": mode,
        "limit": limit.text,
        "relative": limit.relative,
        "threshold": limit.value,
        "attempts": verdicts,
        "passed": passed,
    }
    if args.json:
        print(json.dumps(document, indent=2))
    if passed:
        return 0
    if args.attempt == 1 or chosen.attempts > 1:
        print(
            f"FAILED: {mode} mode overhead above --max-overhead {limit.limit_text()} in every "
            f"one of {len(verdicts)} attempts",
            file=sys.stderr,
        )
    return 1
