"""Calls that might block forever (reading a FIFO), run so that a test fails instead of hanging."""

import os
import threading

import pytest


def within(seconds: float, call, unblock=None):
    """``call()``'s result (or its exception, raised here), failing if it takes longer than ``seconds``; ``unblock``
    then releases the call (so that no thread is left waiting)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if unblock is not None:
            unblock()
        pytest.fail(f"still waiting after {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def release_fifo(path):
    """Open a FIFO for writing and close it: a reader blocked in open() returns and then reads end of file."""
    return lambda: os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
