"""Model structure (sharing, tying, names), decoding with a cache, and input checks."""

import pytest
import torch

from blip_fast.config import BlipConfig, ConfigError, TextConfig, VisionConfig, config_from_dict, tiny_config
from blip_fast.models import GenerationConfig, build_model, generate
from blip_fast.models.med import KVCache
from blip_fast.models.vit import position_embedding_for


def test_pretrain_decoder_shares_everything_but_self_attention():
    model = build_model("pretrain", tiny_config())
    enc, dec = model.text_encoder, model.text_decoder.bert
    assert dec.embeddings is enc.embeddings
    for e, d in zip(enc.encoder.layer, dec.encoder.layer, strict=True):
        assert d.crossattention is e.crossattention
        assert d.intermediate is e.intermediate and d.output is e.output
        assert d.attention is not e.attention
        assert d.attention.self.query.weight.data_ptr() != e.attention.self.query.weight.data_ptr()
    head = model.text_decoder.cls.predictions
    assert head.decoder.weight is enc.embeddings.word_embeddings.weight
    assert head.decoder.bias is head.bias


def test_task_models_have_independent_decoders_where_the_original_does():
    vqa = build_model("vqa", tiny_config())
    assert vqa.text_decoder.bert.embeddings is not vqa.text_encoder.embeddings
    caption = build_model("caption", tiny_config())
    assert caption.text_decoder.cls.predictions.decoder.weight is \
        caption.text_decoder.bert.embeddings.word_embeddings.weight


def test_original_parameter_names():
    keys = set(build_model("pretrain", tiny_config()).state_dict())
    for key in ["visual_encoder.cls_token", "visual_encoder.pos_embed", "visual_encoder.patch_embed.proj.weight",
                "visual_encoder.blocks.1.attn.qkv.weight", "visual_encoder.blocks.0.mlp.fc2.bias",
                "visual_encoder.norm.weight", "text_encoder.embeddings.word_embeddings.weight",
                "text_encoder.encoder.layer.1.attention.self.query.weight",
                "text_encoder.encoder.layer.0.crossattention.output.LayerNorm.weight",
                "text_encoder.encoder.layer.0.intermediate.dense.weight",
                "text_encoder.encoder.layer.0.output.dense.weight",
                "text_decoder.cls.predictions.transform.dense.weight", "text_decoder.cls.predictions.bias",
                "text_decoder.cls.predictions.decoder.weight", "vision_proj.weight", "text_proj.bias",
                "itm_head.weight", "temp", "visual_encoder_m.blocks.0.attn.proj.weight", "text_proj_m.weight",
                "image_queue", "text_queue", "queue_ptr"]:
        assert key in keys, key


def test_momentum_encoders_start_equal_and_frozen():
    model = build_model("pretrain", tiny_config())
    for online, momentum in model.momentum_pairs():
        for p, p_m in zip(online.parameters(), momentum.parameters(), strict=True):
            assert torch.equal(p, p_m) and not p_m.requires_grad


def test_cached_decoding_equals_full_recomputation():
    model = build_model("caption", tiny_config()).eval()
    decoder = model.text_decoder
    context = model.image_embeds(torch.randn(3, 3, 64, 64))
    ids = torch.randint(1000, 2000, (3, 6))
    ids[:, 0] = 30522
    full = decoder.logits(decoder.hidden_states(ids, None, context))
    cache = KVCache.empty(2, capacity=6)
    steps = [decoder.logits(decoder.hidden_states(ids[:, :3], None, context, cache=cache))]
    for t in range(3, 6):
        steps.append(decoder.logits(decoder.hidden_states(ids[:, t:t + 1], None, context, cache=cache)))
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("strategy", ["greedy", "beam", "nucleus"])
def test_generation_respects_lengths(strategy):
    model = build_model("caption", tiny_config()).eval()
    images = torch.randn(2, 3, 64, 64)
    prompt = torch.tensor([[101, 1037, 3861, 1997]] * 2)
    config = GenerationConfig(strategy=strategy, max_length=9, min_length=7)
    out = model.generate(images, prompt, config, torch.Generator().manual_seed(0))
    assert out.shape[0] == 2 and 7 <= out.shape[1] <= 9
    assert torch.equal(out[:, 1:4], prompt[:, 1:]) and (out[:, 0] == 30522).all()


def test_greedy_generation_matches_argmax_unrolled():
    model = build_model("caption", tiny_config()).eval()
    context = model.image_embeds(torch.randn(2, 3, 64, 64))
    ids = torch.full((2, 1), 30522)
    out = generate(model.text_decoder, ids, context, None, GenerationConfig(strategy="greedy", max_length=6,
                                                                            min_length=6), 102, 0)
    for _ in range(5):
        logits = model.text_decoder.logits(model.text_decoder.hidden_states(ids, None, context))[:, -1]
        logits[:, 102] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_position_embedding_resampling():
    pos = torch.randn(1, 1 + 16, 8)
    assert position_embedding_for(pos, (4, 4)) is pos
    resized = position_embedding_for(pos, (6, 5))
    assert resized.shape == (1, 31, 8) and torch.equal(resized[:, 0], pos[:, 0])
    back = position_embedding_for(position_embedding_for(pos, (4, 4)), (4, 4))
    assert torch.equal(back, pos)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("patch, height, width", [(16, 64, 48), (4, 12, 20), (1, 3, 5)])
def test_patch_embedding_gemm_equals_the_convolution(dtype, tol, patch, height, width):
    """The patch embedding as one GEMM over unfolded patches equals timm's strided convolution: tokens (row-major
    patch order) and the gradients of the images, the kernel and the bias (max |diff| / max |conv| <= tol)."""
    from tensor_checks import rel_err

    from blip_fast.models.vit import PatchEmbed

    embed = PatchEmbed(patch, 24).to(dtype)
    images = torch.randn(3, 3, height, width, dtype=dtype, requires_grad=True)
    weights = torch.randn(3, (height // patch) * (width // patch), 24, dtype=dtype)
    leaves = (images, embed.proj.weight, embed.proj.bias)
    gemm = embed(images)
    conv = embed.proj(images).flatten(2).transpose(1, 2)
    assert gemm.shape == conv.shape and rel_err(gemm, conv) <= tol
    for got, want in zip(torch.autograd.grad((gemm * weights).sum(), leaves),
                         torch.autograd.grad((conv * weights).sum(), leaves), strict=True):
        assert rel_err(got, want) <= tol


def test_vit_runs_at_other_resolutions():
    vit = build_model("caption", tiny_config()).visual_encoder
    assert vit(torch.randn(1, 3, 96, 48)).shape == (1, 1 + 6 * 3, 64)


@pytest.mark.parametrize("images,error,match", [
    (torch.randn(2, 64, 64), ValueError, r"\(B, 3, H, W\)"),
    (torch.randn(2, 1, 64, 64), ValueError, r"\(B, 3, H, W\)"),
    (torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8), TypeError, "floating point"),
    (torch.randn(2, 3, 60, 64), ValueError, "multiples of the patch size"),
    ([[0.0]], TypeError, "must be a tensor"),
])
def test_bad_images_are_clear_errors(images, error, match):
    model = build_model("retrieval", tiny_config())
    with pytest.raises(error, match=match):
        model.image_embeds(images)


def test_mismatched_batches_are_clear_errors():
    model = build_model("pretrain", tiny_config())
    with pytest.raises(ValueError, match="2 images but 3 captions"):
        model(torch.randn(2, 3, 64, 64), torch.ones(3, 5, dtype=torch.long), torch.ones(3, 5), alpha=0.4)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        model(torch.randn(1, 3, 64, 64), torch.ones(1, 5, dtype=torch.long), torch.ones(1, 5), alpha=0.4)


def test_too_long_text_is_a_clear_error():
    model = build_model("retrieval", tiny_config())
    with pytest.raises(ValueError, match="exceeds the 64 position embeddings"):
        model.text_features(torch.ones(1, 65, dtype=torch.long), torch.ones(1, 65))


def test_config_validation_and_unknown_keys():
    with pytest.raises(ConfigError, match="not a multiple of patch_size"):
        VisionConfig(image_size=100)
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        TextConfig(hidden_size=100, num_heads=12)
    with pytest.raises(ConfigError, match="momentum must be in"):
        BlipConfig(momentum=1.5)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in vision: widht"):
        config_from_dict(BlipConfig, {"vision": {"widht": 3}})
    with pytest.raises(ConfigError, match="queue_size must be int"):
        config_from_dict(BlipConfig, {"queue_size": "big"})
    config = config_from_dict(BlipConfig, {"vision": {"image_size": 384}, "alpha": 0})
    assert config.vision.image_size == 384 and config.alpha == 0.0
    with pytest.raises(ValueError, match="unknown task"):
        build_model("segmentation", tiny_config())
