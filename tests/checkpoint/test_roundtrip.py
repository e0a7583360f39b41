"""Checkpoints survive the trip: ours -> Salesforce file -> ours, ours -> HF -> ``transformers``,
HF -> ours -> HF, original-style files without our config, other resolutions, old keys.

Models are tiny (``tiny_config``) with their weights redrawn far from the init (std 0.05 to 0.25
per tensor, LayerNorm weights around 1, distinct momentum copies, a moved queue pointer), so a
dropped, swapped or re-initialised tensor changes the outputs. Our own round trips must be exact
(``torch.equal``); comparisons with ``transformers`` use ``max|a - b| / max|b| <= 1e-5`` in fp32 and
equal tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tensor_checks import rel_err
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering

from blip_fast import tolerances
from blip_fast.checkpoint import load_checkpoint, load_hf, load_salesforce, save_hf, save_salesforce
from blip_fast.config import BlipConfig, TextConfig, VisionConfig, config_to_dict, tiny_config
from blip_fast.models import GenerationConfig, build_model
from blip_fast.models.vit import position_embedding_for

TASKS = ("pretrain", "retrieval", "caption", "vqa", "nlvr")  # nlvr: the released model_base_nlvr.pth shape
HF_CLASSES = {"retrieval": BlipForImageTextRetrieval, "caption": BlipForConditionalGeneration,
              "vqa": BlipForQuestionAnswering}
RTOL = tolerances.RTOL[torch.float32]
CLS, SEP, DEC, ENC = 101, 102, 30522, 30523


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    err = rel_err(ours, theirs)
    assert err <= RTOL, f"{what}: rel err {err:.3g} > {RTOL}"


def assert_same_state(ours: dict, theirs: dict, what: str) -> None:
    assert sorted(ours) == sorted(theirs), (f"{what}: keys differ; only in first: "
                                            f"{sorted(set(ours) - set(theirs))}, only in second: "
                                            f"{sorted(set(theirs) - set(ours))}")
    differ = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ: {differ[:10]}"


@torch.no_grad()
def spread_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every parameter (N(0, s^2), s ~ U(0.05, 0.25) per tensor; LayerNorm weights N(1, 0.2^2))
    and move the queue pointers, so that every tensor of the checkpoint matters."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name.lower() and name.endswith("weight"):
            param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
        else:
            std = 0.05 + 0.2 * torch.rand((), generator=generator).item()
            param.copy_(std * torch.randn(param.shape, generator=generator))
    for name, buffer in model.named_buffers():
        if name in ("queue_ptr", "ptr_queue"):
            buffer.fill_(5)
        elif name == "idx_queue":
            buffer.copy_(torch.randint(0, 1000, buffer.shape, generator=generator))
    if hasattr(model, "temp"):
        model.temp.fill_(0.05)
    return model.eval()


def tiny_model(task: str, seed: int = 0, config: BlipConfig | None = None) -> torch.nn.Module:
    return spread_(build_model(task, config or tiny_config()), seed)


def captions(word_counts: list[int], first: int = CLS) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(word_counts) + 2
    ids = torch.zeros(len(word_counts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, count in enumerate(word_counts):
        ids[row, 0], ids[row, count + 1] = first, SEP
        ids[row, 1:count + 1] = torch.randint(1000, 30000, (count,))
        mask[row, :count + 2] = 1
    return ids, mask


def with_first(ids: torch.Tensor, first: int) -> torch.Tensor:
    ids = ids.clone()
    ids[:, 0] = first
    return ids


GREEDY = GenerationConfig(strategy="greedy", max_length=10, min_length=0)


@torch.no_grad()
def task_outputs(model, task: str, size: int = 64) -> dict[str, torch.Tensor]:
    """Deterministic outputs of every head of a task model on seeded inputs."""
    torch.manual_seed(1)
    x = torch.randn(3, 3, size, size)
    ids, mask = captions([1, 7, 4])
    if task == "pretrain":
        model = copy.deepcopy(model)  # the forward updates momentum encoders and queues
        losses = model(x, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(0))
        return {**losses, "image_queue": model.image_queue.clone(), "queue_ptr": model.queue_ptr.clone()}
    if task == "retrieval":
        embeds = model.image_embeds(x)
        return {"image_feat": model.image_features(embeds), "text_feat": model.text_features(ids, mask),
                "itm": model.itm_logits(embeds, with_first(ids, ENC), mask)}
    if task == "caption":
        embeds = model.image_embeds(x)
        dec = with_first(ids, DEC)
        return {"logits": model.text_decoder.logits(model.text_decoder.hidden_states(dec, mask, embeds)),
                "loss": model(x, ids, mask, 2), "tokens": model.generate(x, ids[:, :2], GREEDY)}
    if task == "nlvr":  # three statements about three pairs of images
        pairs = torch.cat([x, torch.randn(3, 3, size, size)])
        return {"logits": model.logits(pairs, with_first(ids, CLS), mask)}
    return {"states": model.question_states(x, ids, mask), "answers": model.generate(x, ids, mask, GREEDY)}


def assert_same_outputs(ours: dict, theirs: dict, what: str) -> None:
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), f"{what}: {key} differs"


# ------------------------------------------------------------------ ours -> Salesforce file -> ours


@pytest.mark.parametrize("task", TASKS)
def test_salesforce_roundtrip_is_exact(tmp_path, task):
    model = tiny_model(task)
    model.config.label_smoothing, model.config.prompt = 0.2, "a photo of "
    path = save_salesforce(model, tmp_path / f"{task}.pth")
    loaded = load_salesforce(path, task=task)
    assert type(loaded) is type(model)
    assert loaded.config == model.config, "blip_fast_config did not round-trip"
    assert_same_state(loaded.state_dict(), model.state_dict(), f"{task} state dict")
    assert_same_outputs(task_outputs(loaded.eval(), task), task_outputs(model, task), task)
    assert type(load_checkpoint(path)) is type(model)


def test_files_of_earlier_versions_with_an_op_backend_in_their_config_load(tmp_path):
    """Earlier versions stored ``impl`` (the op backend, a speed setting) in blip_fast_config and in training
    checkpoints' model_config; it is not part of the architecture any more and is dropped on reading."""
    model = tiny_model("caption")
    path = save_salesforce(model, tmp_path / "old.pth")
    content = torch.load(path, weights_only=True)
    content["blip_fast_config"]["impl"] = "reference"
    content["model_config"] = dict(content["blip_fast_config"])
    torch.save(content, path)
    loaded = load_salesforce(path, task="caption")
    assert loaded.config == model.config and not hasattr(loaded.config, "impl")


def test_salesforce_roundtrip_keeps_sharing_and_tying(tmp_path):
    loaded = load_salesforce(save_salesforce(tiny_model("pretrain"), tmp_path / "p.pth"))
    encoder, decoder = loaded.text_encoder, loaded.text_decoder
    assert decoder.bert.embeddings is encoder.embeddings
    assert decoder.bert.encoder.layer[1].crossattention is encoder.encoder.layer[1].crossattention
    assert decoder.bert.encoder.layer[1].attention is not encoder.encoder.layer[1].attention
    assert decoder.cls.predictions.decoder.weight is encoder.embeddings.word_embeddings.weight
    caption = load_salesforce(save_salesforce(tiny_model("caption"), tmp_path / "c.pth"))
    head = caption.text_decoder.cls.predictions
    assert head.decoder.weight is caption.text_decoder.bert.embeddings.word_embeddings.weight
    assert head.decoder.bias is head.bias


# ------------------------------------------------------------------ ours -> HF directory -> transformers


def hf_from(directory, task):
    hf, info = HF_CLASSES[task].from_pretrained(directory, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}  # missing, unexpected, mismatched keys, errors
    assert not problems, f"transformers loaded {directory} with {problems}"
    return hf.eval()


def test_hf_export_retrieval(tmp_path):
    ours = tiny_model("retrieval")
    hf = hf_from(save_hf(ours, tmp_path), "retrieval")
    x = torch.randn(3, 3, 64, 64)
    ids, mask = captions([1, 7, 13])
    with torch.no_grad():
        embeds = ours.image_embeds(x)
        itm = hf(input_ids=with_first(ids, ENC), pixel_values=x, attention_mask=mask).itm_score
        assert_close(ours.itm_logits(embeds, with_first(ids, ENC), mask), itm, "ITM logits")
        itc = hf(input_ids=ids, pixel_values=x, attention_mask=mask, use_itm_head=False).itm_score
        assert_close(ours.similarity(ours.image_features(embeds), ours.text_features(ids, mask)), itc, "ITC")


def test_hf_export_caption(tmp_path):
    ours = tiny_model("caption")
    hf = hf_from(save_hf(ours, tmp_path), "caption")
    x = torch.randn(3, 3, 64, 64)
    ids, mask = captions([1, 7, 13], DEC)
    prompt = torch.tensor([[CLS, 1037, SEP]]).repeat(3, 1)
    with torch.no_grad():
        theirs = hf(pixel_values=x, input_ids=ids, attention_mask=mask).logits
        mine = ours.text_decoder.logits(ours.text_decoder.hidden_states(ids, mask, ours.image_embeds(x)))
        assert_close(mine, theirs, "LM logits")
        tokens = hf.generate(pixel_values=x, input_ids=prompt.clone(), max_length=10, min_length=0,
                             num_beams=1, do_sample=False)
    assert torch.equal(ours.generate(x, prompt[:, :-1], GREEDY), tokens)


def test_hf_export_vqa(tmp_path):
    ours = tiny_model("vqa")
    hf = hf_from(save_hf(ours, tmp_path), "vqa")
    x = torch.randn(3, 3, 64, 64)
    ids, mask = captions([2, 9, 5])
    with torch.no_grad():
        answers = hf.generate(input_ids=with_first(ids, ENC), pixel_values=x, attention_mask=mask,
                              max_length=10, min_length=0, num_beams=1, do_sample=False)
        image_embeds = hf.vision_model(pixel_values=x).last_hidden_state
        states = hf.text_encoder(input_ids=with_first(ids, ENC), attention_mask=mask,
                                 encoder_hidden_states=image_embeds).last_hidden_state
    assert_close(ours.question_states(x, ids, mask), states, "VQA question states")
    assert torch.equal(ours.generate(x, ids, mask, GREEDY), answers)


def test_hf_roundtrip_keeps_label_smoothing(tmp_path):
    """``save_hf`` writes ``text_config.label_smoothing`` (HF's LM loss reads it); reading it back
    keeps the training loss of a re-imported model equal to HF's."""
    ours = tiny_model("caption")
    ours.config.label_smoothing = 0.2
    hf = hf_from(save_hf(ours, tmp_path), "caption")
    assert hf.text_decoder.label_smoothing == 0.2
    x = torch.randn(2, 3, 64, 64)
    ids, mask = captions([3, 6])
    labels = with_first(ids, DEC).masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    reloaded = load_hf(tmp_path).eval()
    with torch.no_grad():
        theirs = hf(pixel_values=x, input_ids=with_first(ids, DEC), attention_mask=mask, labels=labels).loss
        assert_close(ours(x, ids, mask, 2), theirs, "caption loss of the exported model")
        assert reloaded.config.label_smoothing == 0.2, (
            f"load_hf ignores text_config.label_smoothing: {reloaded.config.label_smoothing} instead of 0.2")
        assert_close(reloaded(x, ids, mask, 2), theirs, "caption loss after HF -> ours")


def test_hf_export_refuses_pretrain(tmp_path):
    with pytest.raises(ValueError, match="no BLIP class for the pretrain model"):
        save_hf(tiny_model("pretrain"), tmp_path)


# ------------------------------------------------------------------ HF -> ours -> HF


@torch.no_grad()
def spread_hf_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        std = 0.05 + 0.2 * torch.rand((), generator=generator).item()
        param.copy_((1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0)
                    + std * torch.randn(param.shape, generator=generator))
    return model.eval()


def small_hf_config(image_size: int = 64) -> transformers.BlipConfig:
    return transformers.BlipConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=16),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=40),
        image_text_hidden_size=48,
    )


@pytest.mark.parametrize("task", ["retrieval", "caption", "vqa"])
def test_hf_to_ours_to_hf(tmp_path, task):
    original = spread_hf_(HF_CLASSES[task](small_hf_config()), seed=4)
    original.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf", task=task)
    assert ours.config.vision.layer_norm_eps == 1e-5 and ours.config.text.layer_norm_eps == 1e-12
    assert ours.config.embed_dim == 48 and ours.config.text.max_position_embeddings == 40
    again = hf_from(save_hf(ours, tmp_path / "again"), task)
    assert_same_state(again.state_dict(), original.state_dict(), f"HF {task} after the round trip")
    for sub in ("vision_config", "text_config"):
        a, b = getattr(again.config, sub), getattr(original.config, sub)
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "layer_norm_eps", "image_size", "patch_size", "vocab_size", "max_position_embeddings"):
            assert getattr(a, key, None) == getattr(b, key, None), f"{sub}.{key}"


def test_load_checkpoint_reads_hf_directories(tmp_path):
    spread_hf_(BlipForConditionalGeneration(small_hf_config()), seed=5).save_pretrained(tmp_path)
    assert load_checkpoint(tmp_path).task == "caption"


# ------------------------------------------------------------------ original files without our config


def wide_head_config() -> BlipConfig:
    """Widths that are multiples of 64 so that ``width // 64`` heads is the true head count."""
    return BlipConfig(
        vision=VisionConfig(image_size=64, patch_size=16, width=128, depth=2, num_heads=2, mlp_ratio=3.0),
        text=TextConfig(hidden_size=128, num_layers=3, num_heads=2, intermediate_size=192,
                        max_position_embeddings=48),
        embed_dim=40, queue_size=24,
    )


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("wrapped", [True, False], ids=["model-key", "bare"])
def test_config_is_inferred_from_shapes(tmp_path, task, wrapped):
    model = tiny_model(task, config=wide_head_config())
    state = model.state_dict()
    torch.save({"model": state} if wrapped else state, tmp_path / "original.pth")
    loaded = load_salesforce(tmp_path / "original.pth")
    assert loaded.task == task
    expected = wide_head_config()
    assert loaded.config.vision == expected.vision and loaded.config.text == expected.text
    if task in ("pretrain", "retrieval"):
        assert loaded.config.embed_dim == expected.embed_dim
        assert loaded.config.queue_size == expected.queue_size
    assert_same_state(loaded.state_dict(), state, f"{task} state dict")
    assert_same_outputs(task_outputs(loaded.eval(), task), task_outputs(model, task), task)


# ------------------------------------------------------------------ another resolution


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_image_size_resamples_position_embeddings(tmp_path, task):
    model = tiny_model(task)
    path = save_salesforce(model, tmp_path / "m.pth")
    loaded = load_salesforce(path, image_size=96).eval()
    assert loaded.config.vision.image_size == 96
    assert loaded.visual_encoder.pos_embed.shape == (1, 37, 64)
    expected = position_embedding_for(model.visual_encoder.pos_embed, (6, 6))
    assert torch.equal(loaded.visual_encoder.pos_embed, expected)
    assert torch.equal(loaded.visual_encoder_m.pos_embed,
                       position_embedding_for(model.visual_encoder_m.pos_embed, (6, 6)))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():  # the 64 px model resamples at run time, the loaded one holds the resampled table
        assert torch.equal(loaded.visual_encoder(x), model.visual_encoder(x))


def test_hf_image_size_matches_interpolate_pos_encoding(tmp_path):
    hf = spread_hf_(BlipForImageTextRetrieval(small_hf_config()), seed=6)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path, image_size=112).eval()
    assert ours.config.vision.image_size == 112
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        theirs = hf.vision_model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        assert_close(ours.visual_encoder(x), theirs, "ViT tokens at 112 px")


# ------------------------------------------------------------------ allow-listed missing and extra keys


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_missing_queues_and_momentum_encoders_are_accepted(tmp_path, task):
    model = tiny_model(task)
    training_only = ("image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr", "temp")
    state = {k: v for k, v in model.state_dict().items()
             if not (k.split(".")[0].endswith("_m") or k in training_only)}
    assert len(state) < len(model.state_dict())
    torch.save({"model": state, "blip_fast_config": config_to_dict(model.config)}, tmp_path / "slim.pth")
    loaded = load_salesforce(tmp_path / "slim.pth", task=task).eval()
    for online, momentum in loaded.momentum_pairs() if task == "pretrain" else [
            (loaded.visual_encoder, loaded.visual_encoder_m), (loaded.vision_proj, loaded.vision_proj_m),
            (loaded.text_encoder, loaded.text_encoder_m), (loaded.text_proj, loaded.text_proj_m)]:
        for (name, p), p_m in zip(online.named_parameters(), momentum.parameters(), strict=True):
            assert torch.equal(p_m, p), f"momentum copy of {name} not filled from the online weight"
            assert p_m.data_ptr() != p.data_ptr() and not p_m.requires_grad
    assert loaded.image_queue.shape == model.image_queue.shape
    assert torch.allclose(loaded.image_queue.norm(dim=0), torch.ones(loaded.image_queue.shape[1]))
    x = torch.randn(2, 3, 64, 64)
    ids, mask = captions([3, 6])
    with torch.no_grad():
        for m in (loaded, model):
            m.outputs = (m.image_features(m.image_embeds(x)), m.text_features(ids, mask),
                         m.itm_logits(m.image_embeds(x), with_first(ids, ENC), mask))
    assert all(torch.equal(a, b) for a, b in zip(loaded.outputs, model.outputs, strict=True))


def test_old_position_ids_keys_are_accepted(tmp_path):
    """Files saved with older ``transformers`` carry BERT's ``embeddings.position_ids`` buffer."""
    model = tiny_model("vqa", config=wide_head_config())
    state = dict(model.state_dict())
    state["text_encoder.embeddings.position_ids"] = torch.arange(48)[None]
    state["text_decoder.bert.embeddings.position_ids"] = torch.arange(48)[None]
    torch.save({"model": state}, tmp_path / "old.pth")
    loaded = load_salesforce(tmp_path / "old.pth", task="vqa")
    assert "text_encoder.embeddings.position_ids" not in loaded.state_dict()
    assert_same_outputs(task_outputs(loaded.eval(), "vqa"), task_outputs(model, "vqa"), "vqa")


def test_mlp_width_survives_a_float_ratio(tmp_path):
    """176 * (240 / 176) is 239.99999999999997: the MLP width is rounded back, not truncated."""
    config = tiny_config()
    config.vision = VisionConfig(**{**config.vision.__dict__, "width": 176, "mlp_ratio": 240 / 176})
    model = build_model("caption", config)
    assert model.visual_encoder.blocks[0].mlp.fc1.out_features == 240
    save_hf(model, tmp_path / "hf")
    assert load_hf(tmp_path / "hf").visual_encoder.blocks[0].mlp.fc1.out_features == 240
