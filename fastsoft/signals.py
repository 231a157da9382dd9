"""Ctrl-C and SIGTERM during a run: the handler only records the signal; the run stops at its next safe point.

A handler that raises (Python's own for SIGINT raises ``KeyboardInterrupt``) can do so inside any code at all: an
import, a half-written report, a library's lock. So while a run holds :func:`stop_requests`, SIGINT and SIGTERM only
set a flag. The run calls :func:`stop_if_requested` where stopping loses nothing — between training steps, between
the teacher's decoding steps, between two jobs' exports — and that raises :class:`Interrupted` there, from fastsoft's
own code; the engine checkpoints and re-raises it, and the CLI exits with 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGINT, signal.SIGTERM)
_arrived: list[int] = []  # signal numbers, in order; written by the handler only
_depth = 0  # nested stop_requests() blocks (the CLI's around the engine's): the outermost restores the handlers
_local = True  # whether stop_if_requested may stop here (False under torchrun's split mode: ranks must stop together)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal at a safe point. A ``KeyboardInterrupt``, so code that handles Ctrl-C handles it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


def _record(signum, frame) -> None:  # the handler: a flag, nothing else
    _arrived.append(signum)


@contextmanager
def stop_requests() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM only set the flag that :func:`stop_if_requested` reads.

    The handlers that were there come back when the outermost block ends. Off the main thread (where Python delivers no
    signals) the block just runs. A signal that was ignored (``SIG_IGN``, as for a background job's SIGINT) stays so.
    """
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    if _depth == 0:
        _arrived.clear()
        for number in HANDLED:
            if signal.getsignal(number) is not signal.SIG_IGN:
                previous[number] = signal.signal(number, _record)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for number, handler in previous.items():
                signal.signal(number, handler)
            _arrived.clear()


def requested() -> int | None:
    """The first signal that asked the run to stop, or None."""
    return _arrived[0] if _arrived else None


def stop_if_requested(local: bool = True) -> None:
    """Raise :class:`Interrupted` if a signal asked the run to stop. Call it only where stopping loses nothing.

    ``local`` checks (inside a stage) are skipped while :func:`collective_stops` is in force: there, ranks stop only
    at the engine's step boundary, where they agree first.
    """
    if _arrived and (_local or not local):
        raise Interrupted(_arrived[0])


@contextmanager
def collective_stops() -> Iterator[None]:
    """Within the block only the engine's own checks (``local=False``) stop the run (ranks that share every step)."""
    global _local
    before, _local = _local, False
    try:
        yield
    finally:
        _local = before
