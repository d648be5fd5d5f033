"""Work a request or job hands off is charged to it: the tasks it creates, and the
functions it runs in thread pools.

An open call (``meterage.OpenCall``: a request's, a job's) is current in its context
(``meterage.current_call()``). asyncio tasks copy the context they are created in, and so do
``asyncio.to_thread`` and anyio's worker threads; ``loop.run_in_executor`` does not. So:

* a task factory on the running loop gives a task created while a probed call is current a
  coroutine whose steps are metered as steps of that call (``OpenCall.steps``);
* ``concurrent.futures.ThreadPoolExecutor.submit`` (which ``run_in_executor`` and
  ``to_thread`` end in) and ``anyio.to_thread.run_sync`` (Starlette's and FastAPI's thread
  pool for sync routes, dependencies and background tasks) run a function submitted while a
  probed call is current through ``OpenCall.run``, in the worker thread.

When no probed call is current (the common case under adaptive sampling) each hook is one
ContextVar read and hands the work on unchanged. Installing is idempotent and done by the
integrations themselves (``install()``); nothing changes for code that never opens a call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from meterage import _native

_CURRENT = _native.current_call_var()
_install_lock = threading.Lock()
_installed = False


def _charged_call() -> _native.OpenCall | None:
    """The current call if its hand-offs are to be charged: probed and not ended."""
    call = _CURRENT.get()
    if call is not None and call.probed and not call.ended:
        return call
    return None


async def _charged_steps(steps: Any) -> Any:
    return await steps


def _charged_coroutine(call: _native.OpenCall, coroutine: Any) -> Any:
    """``coroutine``, its steps metered as steps of ``call``, named like it."""
    driven: Any = _charged_steps(call.steps(coroutine))
    name = getattr(coroutine, "__name__", None)
    if isinstance(name, str):
        driven.__name__ = name
        driven.__qualname__ = getattr(coroutine, "__qualname__", name)
    return driven


_TaskFactory = Callable[..., "asyncio.Future[Any]"]


def _task_factory(previous: _TaskFactory | None) -> _TaskFactory:
    """meterage's factory in front of ``previous`` (native: it runs for every task)."""
    return _native.TaskFactory(
        previous, charge=_charged_coroutine, task=asyncio.Task, is_coroutine=asyncio.iscoroutine
    )


def watch_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Puts meterage's task factory on ``loop``, in front of the loop's own; again if the
    application set another one since (it stays behind meterage's)."""
    current = loop.get_task_factory()
    if getattr(current, "__meterage_previous__", _NOT_OURS) is _NOT_OURS:
        loop.set_task_factory(_task_factory(current))


#: What a task factory that is not meterage's has as its previous one.
_NOT_OURS = object()


_original_submit = concurrent.futures.ThreadPoolExecutor.submit


def _submit(
    self: concurrent.futures.ThreadPoolExecutor,
    fn: Callable[..., Any],
    /,
    *args: Any,
    **kwargs: Any,
) -> concurrent.futures.Future[Any]:
    call = _charged_call()
    if call is None:
        return _original_submit(self, fn, *args, **kwargs)
    return _original_submit(self, call.run, fn, *args, **kwargs)


def _patch_anyio() -> None:
    to_thread: Any = sys.modules.get("anyio.to_thread")
    if to_thread is None:
        try:
            import anyio.to_thread as imported
        except ImportError:
            return
        to_thread = imported
    original: Callable[..., Coroutine[Any, Any, Any]] = to_thread.run_sync
    if getattr(original, "__meterage_original__", None) is not None:
        return

    async def run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = _charged_call()
        if call is None:
            return await original(func, *args, **kwargs)
        return await original(call.run, func, *args, **kwargs)

    run_sync.__doc__ = original.__doc__
    run_sync.__wrapped__ = original  # type: ignore[attr-defined]
    run_sync.__meterage_original__ = original  # type: ignore[attr-defined]
    to_thread.run_sync = run_sync


def install() -> None:
    """Charges hand-offs to the current call from now on (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        concurrent.futures.ThreadPoolExecutor.submit = _submit  # type: ignore[method-assign,assignment]
        _patch_anyio()
        _installed = True
