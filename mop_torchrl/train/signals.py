"""SIGINT and SIGTERM for a training run: the first one deferred to the end of the update.

A terminal sends Ctrl-C to the whole process group and schedulers (SLURM) send SIGTERM before
killing: the loop saves the update it is in and exits 130 or 143 (:class:`~mop_torchrl.train.run.Updates`);
collector workers start with both blocked (:mod:`mop_torchrl.train.collection`), so only the
learner sees them.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Terminated", "deferred_signals", "raise_terminated"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like ``KeyboardInterrupt`` for SIGINT: outside the loop's deferral, or
    as a second SIGTERM inside it (the console script exits 143)."""


def raise_terminated(signum: int, frame: Any) -> None:
    """A SIGTERM handler raising :class:`Terminated`, so ``finally`` blocks and ``atexit``
    (collector shutdown, ``ray.shutdown``) run instead of the process dying at once."""
    raise Terminated


@contextlib.contextmanager
def deferred_signals() -> Iterator[Callable[[], int]]:
    """While active, a first SIGINT or SIGTERM only records its number (read with the yielded
    function; 0 until then); a second one raises ``KeyboardInterrupt`` (SIGINT) or
    :class:`Terminated` (SIGTERM) at once. Outside the main thread it does nothing."""
    received = [0]
    if threading.current_thread() is not threading.main_thread():
        yield lambda: received[0]
        return

    def handler(signum: int, frame: Any) -> None:
        if received[0]:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated
        received[0] = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: received[0]
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)
