"""Ctrl-C and SIGTERM held over a step's commit: delivered when it ends, to the handler that was there."""

from __future__ import annotations

import signal
import threading

import pytest

from fastsoft.train.signals import held_signals


def test_ctrl_c_in_the_block_arrives_after_it_whole():
    # Python's own Ctrl-C handler, set here: a shell starting the tests in the background may have SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with held_signals():
                signal.raise_signal(signal.SIGINT)
                done.append("after the signal")  # the block runs to its end
        assert done == ["after the signal"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with held_signals():
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_goes_to_the_handler_there_before_once():
    class Terminated(Exception):
        pass

    def terminate(number, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with pytest.raises(Terminated):
            with held_signals():
                signal.raise_signal(signal.SIGTERM)
                signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is terminate
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_without_a_signal_nothing_is_raised_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with held_signals():
        pass
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_off_the_main_thread_the_block_just_runs():
    ran = []

    def body():  # signal.signal would raise ValueError here
        with held_signals():
            ran.append(True)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert ran == [True]
