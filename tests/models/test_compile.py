"""``compile_blocks``: a block-compiled pretraining model computes what the eager one computes.

Tolerance (fp32): ``max|compiled - eager| / max|eager|`` <= 1e-5 for each loss and each parameter
gradient. Dropout is off: compiled graphs may draw their masks with another RNG than eager.

The whole-model test compiles with the ``aot_eager`` backend: dynamo's graphs, their guards and
recompilations, and AOTAutograd's forward/backward graphs are what inductor would receive, without
its code generation, which takes ~20 s per graph on this 2-core CPU (the model has ten). One text
layer goes through inductor itself.
"""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from blip_fast import tolerances
from blip_fast.config import tiny_config
from blip_fast.models import BlipPretrain
from blip_fast.models.compile import compile_blocks
from blip_fast.models.med import TextTransformer
from blip_fast.models.packing import PackedText

RTOL = tolerances.RTOL[torch.float32]


@pytest.fixture(autouse=True)
def _fresh_dynamo_one_thread():
    """Compiled graphs are cached per code object across tests: start and end clean. Tiny models
    gain nothing from intra-op threads on the shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def config_without_dropout():
    config = tiny_config()
    config.text.hidden_dropout = config.text.attention_dropout = 0.0
    return config


def batch(lengths: list[int]):
    """Images and padded captions ([CLS] ... [SEP], 0 = padding), one row per caption length."""
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1000, 5000, (length,))
        ids[row, 0], ids[row, length - 1] = 101, 102
    return torch.randn(len(lengths), 3, 64, 64), ids, (ids != 0).long()


def step(model, images, input_ids, attention_mask, packed: bool = False):
    """Losses and parameter gradients of one pretraining step (the gradients are then cleared)."""
    packing = PackedText.from_mask(attention_mask, multiple=8) if packed else None
    losses = model(images, input_ids, attention_mask, 0.4, torch.Generator().manual_seed(0), packing=packing)
    sum(losses.values()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in losses.items()}, grads


def assert_close(actual: dict, expected: dict, what: str):
    assert actual.keys() == expected.keys(), what
    for name, value in expected.items():
        scale = value.abs().max().clamp_min(torch.finfo(value.dtype).tiny)
        err = ((actual[name] - value).abs().max() / scale).item()
        if name.endswith("key.bias"):  # zero in exact arithmetic (softmax ignores a shared shift)
            err = (actual[name] - value).abs().max().item()
        assert err <= RTOL, f"{what} {name}: rel err {err:.3g} > {RTOL}"


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_compiled_pretraining_matches_eager_across_caption_lengths(packed):
    eager = BlipPretrain(config_without_dropout())
    compiled = copy.deepcopy(eager)
    # 2 ViT blocks and 2 text layers, each online and momentum, and the decoder's 2 layers
    assert compile_blocks(compiled, backend="aot_eager", fullgraph=True) == 10
    assert torch._dynamo.config.recompile_limit >= 8 * 6

    for lengths in ([7, 3, 9, 5], [4, 12, 6, 11]):
        images, input_ids, attention_mask = batch(lengths)
        expected_losses, expected_grads = step(eager, images, input_ids, attention_mask, packed)
        losses, grads = step(compiled, images, input_ids, attention_mask, packed)
        assert_close(losses, expected_losses, f"L={max(lengths)} loss")
        assert_close(grads, expected_grads, f"L={max(lengths)} gradient of")
    for name, buffer in eager.named_buffers():  # queues and their pointer, written by the eager code
        assert torch.equal(buffer, compiled.state_dict()[name]), name

    # the second length (and token count) made the text layers' shapes symbolic: a third one compiles nothing
    graphs = counters["stats"]["unique_graphs"]
    step(compiled, *batch([5, 8, 3, 10]), packed)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_inductor_text_layer_matches_eager(packed):
    """One ITM-style text layer (padding mask, cross-attention to image keys/values), through
    inductor with symbolic shapes from the start, forward and backward; padded or packed."""
    config = config_without_dropout().text
    config.num_layers = 1
    eager = TextTransformer(config, encoder_width=64)
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, fullgraph=True, dynamic=True) == 1
    image = torch.randn(3, 17, 64)
    for lengths in ([5, 2, 7], [9, 4, 6]):
        _, input_ids, attention_mask = batch(lengths)
        # a random readout: the output ends in a LayerNorm, whose sum of squares has no gradient
        readout = torch.randn(3, max(lengths), 64)
        results = []
        for model in (eager, compiled):
            image_in = image.clone().requires_grad_()
            packing = PackedText.from_mask(attention_mask, multiple=4) if packed else None
            out = model(input_ids, attention_mask, context_kv=model.context_keys_values(image_in), packing=packing)
            if packed:
                out = packing.unpack(out) * attention_mask[..., None]
            (out * readout).sum().backward()
            grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
            results.append(({"out": out.detach(), "image": image_in.grad}, grads))
        assert_close(results[1][0], results[0][0], f"L={max(lengths)}")
        assert_close(results[1][1], results[0][1], f"L={max(lengths)} gradient of")


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_block_compiled_captioning_generates_the_eager_tokens(strategy):
    # decoding steps go through the compiled text layers with a growing cache: the prompt step is causal, the one-token
    # steps attend to every cached key (a Python bool chosen from the cache's length, never from a symbolic shape)
    from blip_fast.models import BlipCaption
    from blip_fast.models.generation import GenerationConfig

    torch.manual_seed(0)
    eager = BlipCaption(config_without_dropout()).eval()
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, backend="aot_eager", fullgraph=True) == 4
    images = torch.randn(3, 3, 64, 64)
    prompt = torch.tensor([[101, 1037, 3861, 1997]]).repeat(3, 1)  # [CLS] a picture of
    generation = GenerationConfig(strategy=strategy, max_length=12, min_length=6, num_beams=2)
    expected = eager.generate(images, prompt, generation)
    assert torch.equal(compiled.generate(images, prompt, generation), expected)
