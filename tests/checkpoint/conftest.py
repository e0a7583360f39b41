"""Checkpoints the checkpoint tests share."""

import pytest
import transformers
from transformers import BlipForConditionalGeneration


@pytest.fixture(scope="module")
def hf_caption_dir(tmp_path_factory):
    """A tiny random Hugging Face captioning model saved by transformers itself (32 px, 64 wide, one layer each)."""
    directory = tmp_path_factory.mktemp("hf_caption")
    transformers.logging.set_verbosity_error()
    config = transformers.BlipConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=16),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         max_position_embeddings=32),
    )
    BlipForConditionalGeneration(config).save_pretrained(directory)
    return directory
