import pytest

from blip_fast.data.synth import write_synthetic_dataset


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A small built-in dataset shared by the engine tests (600 scenes at 64 px: 540 train, 30 val, 30 test)."""
    folder = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(folder, 600, image_size=64, seed=42)
    return folder

