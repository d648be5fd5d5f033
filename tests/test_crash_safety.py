"""meterage never crashes the interpreter: no half-built native objects, no C stack
overflow through metered recursion, no Rust panic crossing into Python.

Everything that could crash runs in a child interpreter (``sys.executable -c``), so a
segfault or an abort fails the test instead of killing pytest. Self-contained: no fixture
of tests/conftest.py is needed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter (the one running the tests)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def lines_of(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The child's stdout lines, after checking that it exited normally."""
    assert result.returncode == 0, (
        f"the child interpreter died (returncode {result.returncode})\n"
        f"stdout:\n{result.stdout}\nstderr (tail):\n{result.stderr[-3000:]}"
    )
    return result.stdout.splitlines()


# --- 1. Native classes that cannot be built from Python refuse with TypeError -------------


def test_metered_wrapper_types_cannot_be_built_from_python() -> None:
    # Before: MeteredFunction() built an object with no function and no meter, and its
    # repr (or a call) dereferenced the null pointers: a segfault.
    result = run_python(
        """
        import meterage

        for cls in (meterage.MeteredFunction, meterage.MeteredCallable):
            for how, make in (("call", lambda: cls()), ("new", lambda: cls.__new__(cls))):
                try:
                    made = make()
                except TypeError:
                    print(cls.__name__, how, "refused")
                else:
                    print(cls.__name__, how, "built", repr(made), made())
        """
    )
    assert lines_of(result) == [
        "MeteredFunction call refused",
        "MeteredFunction new refused",
        "MeteredCallable call refused",
        "MeteredCallable new refused",
    ]


@pytest.mark.parametrize(
    "name",
    [
        "Call",
        "Steps",
        "Series",
        "HistogramSnapshot",
        "BoundHistogram",
        "BoundCounter",
        "OpenCall",
    ],
)
def test_native_class_without_a_constructor_refuses(name: str) -> None:
    result = run_python(
        f"""
        from meterage import _native

        cls = getattr(_native, {name!r})
        for how, make in (("call", lambda: cls()), ("new", lambda: cls.__new__(cls))):
            try:
                made = make()
            except TypeError:
                print(how, "refused")
            else:
                print(how, "built", repr(made), dir(made))
        """
    )
    assert lines_of(result) == ["call refused", "new refused"]


def test_the_handle_a_block_method_lookup_makes_is_a_call() -> None:
    # A meter's four block methods are BlockMethod descriptors on the class; looking one up
    # on a meter makes the block's Call (see rust/binding/block.rs). Neither type, nor the
    # awaitable an async block's exit returns, is buildable directly.
    result = run_python(
        """
        import meterage
        from meterage import _native

        meter = meterage.meter("crash.handle")
        print(type(meter.__exit__) is meterage.Call)
        for name in ("__enter__", "__exit__", "__aenter__", "__aexit__"):
            print(type(_native.MeterCore.__dict__[name]).__name__)
        exit_handle = meter.__aexit__
        enter_handle = meter.__aenter__
        assert exit_handle is enter_handle  # one call per block: both lookups give it
        made = []
        for cls in (type(_native.MeterCore.__dict__["__exit__"]), meterage.Call):
            for make in (lambda: cls(), lambda: cls.__new__(cls)):
                try:
                    make()
                except TypeError:
                    made.append("refused")
        print(made)
        """
    )
    assert lines_of(result) == [
        "True",
        "BlockMethod",
        "BlockMethod",
        "BlockMethod",
        "BlockMethod",
        "['refused', 'refused', 'refused', 'refused']",
    ]


# --- 2. Deep recursion through metered callables raises RecursionError --------------------

DEEP = """
import sys, threading, asyncio
import meterage

sys.setrecursionlimit(200_000)
"""


def test_deep_recursion_through_a_metered_function_raises_recursion_error() -> None:
    # Before: a segfault at ~12,000 frames (each metered level is a C call).
    result = run_python(
        DEEP
        + """
@meterage.meter("crash.recurse.function")
def down(n):
    return 0 if n == 0 else down(n - 1) + 1

try:
    down(100_000)
except RecursionError:
    print("RecursionError")
else:
    print("no error")
print(down(50))
"""
    )
    assert lines_of(result) == ["RecursionError", "50"]


def test_deep_recursion_through_a_metered_method_raises_recursion_error() -> None:
    result = run_python(
        DEEP
        + """
class Walker:
    @meterage.meter("crash.recurse.method")
    def down(self, n):
        return 0 if n == 0 else self.down(n - 1) + 1

try:
    Walker().down(100_000)
except RecursionError:
    print("RecursionError")
else:
    print("no error")
print(Walker().down(50))
"""
    )
    assert lines_of(result) == ["RecursionError", "50"]


def test_deep_recursion_in_a_thread_with_a_4_mib_stack_raises_recursion_error() -> None:
    result = run_python(
        DEEP
        + """
@meterage.meter("crash.recurse.thread")
def down(n):
    return 0 if n == 0 else down(n - 1) + 1

outcome = []

def run():
    try:
        down(100_000)
    except RecursionError:
        outcome.append("RecursionError")
    else:
        outcome.append("no error")
    outcome.append(down(50))

threading.stack_size(4 * 1024 * 1024)
thread = threading.Thread(target=run)
thread.start()
thread.join()
print(outcome)
"""
    )
    assert lines_of(result) == ["['RecursionError', 50]"]


@pytest.mark.parametrize("stack_kib", [256, 1024])
def test_deep_recursion_in_a_thread_with_a_small_stack_raises_recursion_error(
    stack_kib: int,
) -> None:
    # The guard keeps a share of a small stack free (see rust/binding/guard.rs).
    result = run_python(
        DEEP
        + f"""
@meterage.meter("crash.recurse.small_stack")
def down(n):
    return 0 if n == 0 else down(n - 1) + 1

outcome = []

def run():
    try:
        down(100_000)
    except RecursionError:
        outcome.append("RecursionError")
    else:
        outcome.append("no error")
    outcome.append(down(5))

threading.stack_size({stack_kib} * 1024)
thread = threading.Thread(target=run)
thread.start()
thread.join()
print(outcome)
"""
    )
    assert lines_of(result) == ["['RecursionError', 5]"]


def test_deep_recursion_through_a_metered_coroutine_raises_recursion_error() -> None:
    result = run_python(
        DEEP
        + """
@meterage.meter("crash.recurse.coroutine")
async def down(n):
    return 0 if n == 0 else await down(n - 1) + 1

try:
    asyncio.run(down(100_000))
except RecursionError:
    print("RecursionError")
else:
    print("no error")
print(asyncio.run(down(50)))
"""
    )
    assert lines_of(result) == ["RecursionError", "50"]


def test_deep_recursion_through_a_metered_generator_raises_recursion_error() -> None:
    result = run_python(
        DEEP
        + """
@meterage.meter("crash.recurse.generator")
def down(n):
    if n:
        yield from down(n - 1)
    else:
        yield "bottom"

try:
    list(down(100_000))
except RecursionError:
    print("RecursionError")
else:
    print("no error")
print(list(down(50)))
"""
    )
    assert lines_of(result) == ["RecursionError", "['bottom']"]


def test_metered_recursion_reaches_the_unmetered_depth_range_at_the_default_limit() -> None:
    result = run_python(
        """
        import sys
        import meterage

        depth = 0

        def plain(n):
            global depth
            depth = n
            return plain(n + 1)

        @meterage.meter("crash.recurse.default_limit")
        def metered(n):
            global depth
            depth = n
            return metered(n + 1)

        print(sys.getrecursionlimit())
        for function in (plain, metered):
            depth = 0
            try:
                function(1)
            except RecursionError:
                print(depth)
        """
    )
    limit, plain_depth, metered_depth = (int(line) for line in lines_of(result))
    print(f"recursion limit {limit}: unmetered depth {plain_depth}, metered {metered_depth}")
    assert plain_depth > limit // 2
    assert metered_depth >= 0.4 * plain_depth


# --- 3. A Rust panic inside meterage never aborts the process -----------------------------

PANIC = """
import meterage
from meterage import _native

def counts(operation):
    return sorted(
        (sorted(s.attributes.items()), s.count)
        for s in meterage.snapshot()
        if s.operation == operation
    )
"""


@pytest.mark.parametrize("probes", [None, ()], ids=["probed", "timer_only"])
def test_a_panic_while_recording_leaves_the_call_and_the_process_intact(
    probes: tuple[str, ...] | None,
) -> None:
    result = run_python(
        PANIC
        + f"""
@meterage.meter("crash.panic.value", probes={probes!r}, sample=1.0)
def make(n):
    return ["value", n]

_native._panic_in_next_record()
value = make(1)
print(value == ["value", 1], type(value).__name__)
print("after the panic", counts("crash.panic.value"))
print(make(2))
print("next call", counts("crash.panic.value"))
print(make(3))
print("and the one after", counts("crash.panic.value"))
"""
    )
    assert lines_of(result) == [
        "True list",
        "after the panic []",
        "['value', 2]",
        "next call [([], 1)]",
        "['value', 3]",
        "and the one after [([], 2)]",
    ]


def test_a_panic_armed_for_a_raising_function_leaves_its_exception_unchanged() -> None:
    result = run_python(
        PANIC
        + """
import traceback

error = LookupError("the function's own")

@meterage.meter("crash.panic.raise", sample=1.0)
def fail():
    raise error

_native._panic_in_next_record()
try:
    fail()
except LookupError as caught:
    print(caught is error, caught.args)
    print([frame.name for frame in traceback.extract_tb(caught.__traceback__)])
    print(caught.__context__, caught.__cause__)
else:
    print("no exception")
print("alive")
"""
    )
    assert lines_of(result) == [
        'True ("the function\'s own",)',
        "['<module>', 'fail']",
        "None None",
        "alive",
    ]


def test_a_panic_armed_for_a_raising_function_drops_only_that_call() -> None:
    result = run_python(
        PANIC
        + """
error = LookupError("the function's own")

@meterage.meter("crash.panic.raise_once", sample=1.0)
def fail():
    raise error

@meterage.meter("crash.panic.after", sample=1.0)
def succeed():
    return "ok"

_native._panic_in_next_record()
for _ in range(2):
    try:
        fail()
    except LookupError as caught:
        print(caught is error)
    print(counts("crash.panic.raise_once"))
print(succeed(), counts("crash.panic.after"))
"""
    )
    assert lines_of(result) == [
        "True",
        "[]",
        "True",
        "[([('error.type', 'LookupError')], 1)]",
        "ok [([], 1)]",
    ]
