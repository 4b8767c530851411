"""Ctrl-C held back for the length of a call that must finish whole or stop cleanly."""

from __future__ import annotations

import contextlib
import signal


@contextlib.contextmanager
def interrupts_held():
    """Holds Ctrl-C back for the block: the ``KeyboardInterrupt`` of a SIGINT that arrives
    meanwhile is raised as soon as the block ends. Yields the list of SIGINTs received so far
    (empty until one arrives), which a long library call polls to stop early (a progress
    callback that cancels). Only in the main thread of the main interpreter, where Python runs
    signal handlers, and only under Python's own SIGINT handler: one the program installed
    (asyncio's, a training loop's) runs as usual, and the list stays empty."""
    received, previous = [], None
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # (another thread or interpreter)
        pass
    if previous is None:
        yield received
        return
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)
