"""Ctrl-C and SIGTERM during a run set a flag; the run stops where it checks it, never inside other code."""

from __future__ import annotations

import signal
import threading

import pytest

from fastsoft import signals


@pytest.fixture(autouse=True)
def python_handlers():
    # Python's own Ctrl-C handler, set here: a shell starting the tests in the background may have SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGINT, previous[0])
    signal.signal(signal.SIGTERM, previous[1])


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_only_sets_the_flag_and_stops_at_the_next_check(number):
    done = []
    with signals.stop_requests():
        signal.raise_signal(number)
        done.append("the code it arrived in ran on")
        assert signals.requested() == number
        with pytest.raises(signals.Interrupted) as stopped:
            signals.stop_if_requested()
    assert done == ["the code it arrived in ran on"]
    assert isinstance(stopped.value, KeyboardInterrupt) and stopped.value.exit_status == 128 + number
    assert signals.requested() is None  # cleared with the block
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_nested_blocks_keep_the_flag_until_the_outermost_ends():
    with signals.stop_requests():
        with signals.stop_requests():
            signal.raise_signal(signal.SIGTERM)
        assert signals.requested() == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # still the flag's handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_ignored_signal_stays_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with signals.stop_requests():
        signal.raise_signal(signal.SIGINT)
        assert signals.requested() is None
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_collective_stops_skip_the_checks_inside_stages():
    with signals.stop_requests(), signals.collective_stops():
        signal.raise_signal(signal.SIGINT)
        signals.stop_if_requested()  # a stage's check: ranks must agree first, so not here
        with pytest.raises(signals.Interrupted):
            signals.stop_if_requested(local=False)  # the engine's, after the ranks agreed


def test_without_a_signal_nothing_is_raised():
    with signals.stop_requests():
        signals.stop_if_requested()


def test_off_the_main_thread_the_block_just_runs():
    ran = []

    def body():  # signal.signal would raise ValueError here
        with signals.stop_requests():
            ran.append(True)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert ran == [True]
