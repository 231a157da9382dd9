"""Hold Ctrl-C and SIGTERM while a step's results are written into the run's state.

A checkpoint taken on an interrupt must describe a state the uninterrupted run also passed through: either the step
happened (the optimizer moved, every job's step count, losses and stop decision follow) or it did not. The forward and
backward stay interruptible (they change nothing a checkpoint keeps); the short commit after them is not.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HELD = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def held_signals() -> Iterator[None]:
    """Run the block with SIGINT and SIGTERM held; one that arrived is delivered to its own handler when it ends.

    Off the main thread (where Python delivers no signals) the block just runs.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {number: signal.signal(number, lambda number, frame: arrived.append(number)) for number in HELD}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if arrived:  # the handler as it was raises (KeyboardInterrupt, the CLI's Terminated) or ends the process
            signal.raise_signal(arrived[0])
