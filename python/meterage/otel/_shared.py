"""One native reading shared by the observable instruments of one collection.

The SDK calls each instrument's callback once per collection, in an order of its own.
Reading the machine once per callback would multiply the cost by the number of instruments
(and give them readings from different instants), so a `SharedReading` serves one reading
to each callback once: a callback asking again means a new collection has started, which
reads again. A reading is never shared for longer than ``MAX_AGE_S``. Collections of
several readers may run at once, so everything is behind one lock. A reading that fails
is logged once and serves its empty value (the values are left out): collections go on.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from opentelemetry.metrics import CallbackOptions, Observation

T = TypeVar("T")

_logger = logging.getLogger("meterage.otel")

MAX_AGE_S = 0.05
"""The longest a reading is shared between the callbacks of one collection."""


class SharedReading(Generic[T]):
    """``reading(callback)`` returns the current collection's reading of ``read()``."""

    def __init__(self, read: Callable[[], T], empty: T, *, name: str = "a reading") -> None:
        self.lock = threading.Lock()
        self._read = read
        self._empty = empty
        self._name = name
        self._failed_once = False
        self.current: T = copy.copy(empty)
        self.read_at = -math.inf  # time.monotonic() of the current reading
        self._served: set[int] = set()  # the callbacks the current reading has served
        self._pid = os.getpid()

    def forked(self) -> None:
        """A forked child: the reading and anything derived from it are the parent's."""

    def refreshed(self) -> None:
        """A new reading was taken: values derived from the previous one are stale."""

    def refresh(self, callback: int) -> None:
        """Takes a new reading unless ``callback`` has not been served the current one.
        Call with ``lock`` held."""
        now = time.monotonic()
        pid = os.getpid()
        if pid != self._pid:
            self._pid = pid
            self.read_at = -math.inf
            self.forked()
        if callback not in self._served and now - self.read_at < MAX_AGE_S:
            self._served.add(callback)
            return
        try:
            self.current = self._read()
        except Exception as error:
            # The SDK would log the failure of every callback at every collection.
            if not self._failed_once:
                self._failed_once = True
                _logger.warning(
                    "meterage: reading %s failed (%r); its values are left out while it fails",
                    self._name,
                    error,
                    exc_info=True,
                )
            self.current = copy.copy(self._empty)  # refreshed() may add to it
        self.read_at = now
        self._served = {callback}
        self.refreshed()

    def reading(self, callback: int) -> T:
        """The reading for one collection; ``callback`` identifies the asking callback."""
        with self.lock:
            self.refresh(callback)
            return self.current


Callback = Callable[[CallbackOptions], Iterable[Observation]]


def gated(callback: Callback, enabled: Callable[[], bool] | None) -> Callback:
    """``callback``, observing nothing while ``enabled()`` is false (the SDK cannot remove an
    instrument: a detached provider keeps meterage's, and they must go quiet)."""
    if enabled is None:
        return callback
    is_enabled = enabled  # not None, also inside the closure

    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return callback(options) if is_enabled() else []

    return observe
