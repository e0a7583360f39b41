"""The shape registry says what the model presets build: what the parity cases, benchmarks and tests measure is
the model that is trained."""

from blip_fast import shapes
from blip_fast.config import base_config, large_config


def test_vision_shapes_are_the_presets():
    for preset, width, heads in ((base_config, shapes.BASE_WIDTH, shapes.BASE_HEADS),
                                 (large_config, shapes.LARGE_WIDTH, shapes.LARGE_HEADS)):
        for image_size, tokens in ((shapes.PRETRAIN_IMAGE_SIZE, shapes.IMAGE_TOKENS_224),
                                   (shapes.FINETUNE_IMAGE_SIZE, shapes.IMAGE_TOKENS_384)):
            vision = preset(image_size).vision
            assert (vision.width, vision.num_heads, vision.width // vision.num_heads) == (width, heads, shapes.HEAD_DIM)
            assert (vision.patch_size, 1 + vision.num_patches) == (shapes.PATCH_SIZE, tokens)


def test_text_and_contrastive_shapes_are_the_presets():
    for preset in (base_config, large_config):
        config = preset()
        text = config.text
        assert (text.hidden_size, text.num_heads, text.vocab_size) == (shapes.BASE_WIDTH, shapes.BASE_HEADS,
                                                                       shapes.VOCAB_SIZE)
        assert text.hidden_size // text.num_heads == shapes.HEAD_DIM
        assert (config.embed_dim, config.queue_size) == (shapes.EMBED_DIM, shapes.QUEUE_SIZE)
        assert config.max_text_length == shapes.PRETRAIN_TEXT_LENGTH


def test_the_pretraining_batch_fills_the_queue_exactly():
    # the original's enqueue asserts that the queue is a multiple of the (gathered) batch
    assert shapes.QUEUE_SIZE % shapes.PRETRAIN_BATCH == 0
