"""A small synthetic dataset shared by the data tests (written once per session)."""

import pytest

from blip_fast.data.synth import write_synthetic_dataset


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """80 scenes of 24 px: 72 train (9 shards of 8), 4 val, 4 test; a quarter of the training captions noisy."""
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, 80, noise=0.25, image_size=24, seed=5, shard_size=8)
    return out
