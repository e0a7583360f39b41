"""Shared test set-up: every test is seeded; ``gpu`` tests are skipped without CUDA; ``original`` tests are
skipped without the original BLIP code, or fail with ``BLIP_FAST_REQUIRE_ORIGINAL=1`` (CI); ``one_intra_op_thread``."""

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this once, when first imported (blip_fast.ops imports it): without a GPU the
    # Triton kernels run in its interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from blip_fast import ops  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: base-size models; still part of the CPU suite")
    config.addinivalue_line("markers", "original(available, install): compares against the original BLIP code "
                            "(blip-ci); skipped when it is not available, a failure with BLIP_FAST_REQUIRE_ORIGINAL=1")
    # Triton 3.6's interpreter turns each loop bound read from memory (1-element arrays) into an int the way NumPy
    # deprecated; NumPy < 2.4 (pinned by the test extra) still does it, and says so thousands of times
    config.addinivalue_line("filterwarnings",
                            "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # CI installs the original (make setup-test) and sets BLIP_FAST_REQUIRE_ORIGINAL=1: there a missing package
    # fails the comparisons instead of skipping them unnoticed; a developer without it still gets skips
    marker = item.get_closest_marker("original")
    if marker is None or marker.kwargs["available"]:
        return
    reason = f"the original BLIP is not installed: {marker.kwargs['install']}"
    if os.environ.get("BLIP_FAST_REQUIRE_ORIGINAL") == "1":
        pytest.fail(f"BLIP_FAST_REQUIRE_ORIGINAL=1 but {reason}", pytrace=False)
    pytest.skip(f"{reason} (BLIP_FAST_REQUIRE_ORIGINAL=1 makes this a failure)")


_passed = 0


def pytest_runtest_logreport(report):
    global _passed
    if report.when == "call" and report.passed:
        _passed += 1


def pytest_sessionfinish(session, exitstatus):
    # a run in which every test was skipped proves nothing: fail it
    if exitstatus == 0 and _passed == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nno test passed (all skipped or none collected): failing the run")


@pytest.fixture(autouse=True)
def _seed_and_reset():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ops.set_impl(None)
    yield
    ops.set_impl(None)


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One intra-op thread while a module's tests run, restored after. Tiny models gain nothing from threads;
    with other jobs on 2 CPU cores every op would wait for a descheduled worker (~8 ms each); and bitwise
    comparisons need it: some CPU kernels sum in an order that depends on how the work is split."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
