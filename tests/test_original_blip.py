"""The original BLIP (``blip-ci``, loaded by ``benchmarks/original_blip.py``) against our BlipPretrain.

With the same weights, images, captions and alpha, both give the same ITC, ITM and LM losses, the
same gradient for every parameter, and leave the same momentum encoders and queues behind. ITM's
hard negatives are random, drawn differently (the original: ``torch.multinomial`` per row; ours:
inverse-CDF uniforms): with a batch of 2 the only negative of each row is the other one, so all
three losses compare; with a batch of 4 ITC and LM do. Tolerance: fp32, 1e-5 relative on the
losses (seen: below 3e-7), gradients within 1e-4 of each tensor's largest gradient.

The models: ViT-B/16 at 32 px (the original has ViT-B and ViT-L only; 4 patches keep it cheap on
CPU) and a 2-layer, 64-wide text transformer written to the original's med_config JSON. Dropout 0.

Skipped when blip-ci is not installed (``pip install --no-deps blip-ci==0.0.5``; ``make setup-test`` installs
it), or failed with ``BLIP_FAST_REQUIRE_ORIGINAL=1`` (``make test``), except the checks that ``bench step --impl
original`` then fails with that hint.
"""

import copy
import importlib.util
import subprocess
import sys
import types

import pytest
import torch
from original_checks import (
    BENCHMARKS,
    CAPTIONS,
    assert_same_gradients,
    benchmark_script,
    needs_original,
    original_blip,
    small_config,
)

from blip_fast import ops
from blip_fast.config import preset
from blip_fast.models.blip_pretrain import BlipPretrain
from blip_fast.text import BlipTokenizer


@pytest.fixture(scope="module")
def models():
    """(ours, original) with the same weights, queues included."""
    torch.manual_seed(0)
    config = small_config()
    ours = BlipPretrain(config).train()
    original = original_blip.build_original_pretrain(config).train()
    missing, unexpected = original.load_state_dict(ours.state_dict(), strict=False)
    # our names are the original's (Salesforce checkpoints load directly); only its position_ids buffers are extra
    assert unexpected == []
    assert sorted(missing) == sorted(f"{m}.embeddings.position_ids"
                                     for m in ("text_encoder", "text_encoder_m", "text_decoder.bert"))
    return ours, original


def _step(models, batch, impl):
    ours, original = (copy.deepcopy(m) for m in models)
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    captions = CAPTIONS[:batch]
    tokens = BlipTokenizer()(captions, max_length=30, padding="max_length")
    with ops.impl_scope(impl):
        losses = ours(images, tokens.input_ids, tokens.attention_mask, alpha=0.4)
    loss_ita, loss_itm, loss_lm = original(images, captions, 0.4)
    sum(losses.values()).backward()
    (loss_ita + loss_itm + loss_lm).backward()
    return ours, original, losses, {"itc": loss_ita, "itm": loss_itm, "lm": loss_lm}


@needs_original
@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("batch", [2, 4])
def test_same_losses_gradients_and_state_as_the_original(models, batch, impl):
    ours, original, our_losses, original_losses = _step(models, batch, impl)
    compared = ("itc", "itm", "lm") if batch == 2 else ("itc", "lm")  # batch 2: the ITM negatives are forced
    for name in compared:
        torch.testing.assert_close(our_losses[name], original_losses[name].detach(), rtol=1e-5, atol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
    if batch != 2:
        return
    assert_same_gradients(ours, original)
    # the momentum update ran the same, and the same momentum features went into the queues
    original_state = original.state_dict()
    for name, value in ours.state_dict().items():
        if name.endswith("_m") or "_m." in name or "queue" in name:
            torch.testing.assert_close(value, original_state[name], rtol=1e-5, atol=1e-6, msg=name)


@needs_original
def test_offline_tokenizer_matches_ours():
    tokenizer = original_blip.offline_tokenizer()
    assert (len(tokenizer), tokenizer.bos_token_id, tokenizer.enc_token_id, tokenizer.pad_token_id) == (
        30524, 30522, 30523, 0)
    theirs = tokenizer(CAPTIONS + ["Ünïcode, [ENC] and PUNCTUATION!!"], padding="max_length", truncation=True,
                       max_length=30, return_tensors="pt")
    ours = BlipTokenizer()(CAPTIONS + ["Ünïcode, [ENC] and PUNCTUATION!!"], max_length=30, padding="max_length")
    assert torch.equal(theirs.input_ids, ours.input_ids) and torch.equal(theirs.attention_mask, ours.attention_mask)


@needs_original
def test_shims_exist_only_while_installed():
    lacking = original_blip._lacking()
    with original_blip._shims_installed():
        assert original_blip._lacking() == []
    assert original_blip._lacking() == lacking
    if importlib.util.find_spec("timm") is None:
        assert not any(name == "timm" or name.startswith("timm.") for name in sys.modules)


@needs_original
def test_loading_keeps_process_wide_settings(tmp_path):
    # the original's import ignores all warnings and silences transformers' logging, process-wide
    script = tmp_path / "load.py"
    script.write_text(
        "import importlib.util, sys, warnings\n"
        "import transformers\n"
        f"spec = importlib.util.spec_from_file_location('original_blip', {str(BENCHMARKS / 'original_blip.py')!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "before = (list(warnings.filters), transformers.logging.get_verbosity())\n"
        "module.load_original()\n"
        "assert (list(warnings.filters), transformers.logging.get_verbosity()) == before\n"
        "assert 'blip.models.blip_pretrain' in sys.modules\n")
    subprocess.run([sys.executable, str(script)], check=True)


@needs_original
def test_concat_all_gather_without_a_process_group_is_a_copy():
    gather = original_blip.load_original().concat_all_gather
    x = torch.randn(3, 4)
    y = gather(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


def test_bench_original_without_the_package_names_the_install(monkeypatch, capsys):
    monkeypatch.setattr(original_blip, "is_available", lambda: False)
    with pytest.raises(SystemExit) as raised:
        benchmark_script("bench_step").main(["--preset", "base", "--impl", "original", "--steps", "1"])
    assert "pip install --no-deps blip-ci==0.0.5" in str(raised.value) and "\n" not in str(raised.value)


def test_original_needs_a_vit_the_original_has():
    with pytest.raises(ValueError, match="ViT-B/16 and ViT-L/16 only"):
        original_blip._vit_name(preset("tiny"))
    assert original_blip._vit_name(preset("base")) == "base" and original_blip._vit_name(preset("large")) == "large"


def test_head_mask_shim_broadcasts_like_transformers_4():
    # transformers 4.15 semantics: (heads,) -> every layer, (layers, heads) -> per layer, as (L, 1, H, 1, 1) scales
    holder = types.SimpleNamespace(dtype=torch.float32)
    assert original_blip.get_head_mask(holder, None, 3) == [None, None, None]
    per_head = original_blip.get_head_mask(holder, torch.tensor([1.0, 0.0]), 3)
    assert per_head.shape == (3, 1, 2, 1, 1) and per_head[:, 0, 1].eq(0).all() and per_head[:, 0, 0].eq(1).all()
    per_layer = original_blip.get_head_mask(holder, torch.ones(3, 2), 3, is_attention_chunked=True)
    assert per_layer.shape == (3, 1, 2, 1, 1, 1)
    with pytest.raises(ValueError, match="head_mask must be"):
        original_blip.get_head_mask(holder, torch.ones(1, 1, 2), 3)


def test_adapt_input_conv_shim():
    weight = torch.randn(8, 3, 4, 4)
    assert torch.allclose(original_blip.adapt_input_conv(1, weight), weight.sum(dim=1, keepdim=True))
    assert original_blip.adapt_input_conv(6, weight).shape == (8, 6, 4, 4)
    with pytest.raises(ValueError, match="cannot adapt a 4-channel"):
        original_blip.adapt_input_conv(6, torch.randn(8, 4, 4, 4))
