"""Shared test set-up: every test is seeded; ``gpu`` tests are skipped without CUDA."""

import random

import numpy as np
import pytest
import torch

from blip_fast import ops


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: base-size models; still part of the CPU suite")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_reset():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ops.set_impl(None)
    yield
    ops.set_impl(None)
