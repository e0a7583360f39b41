"""init_vision / init_text (blip_fast.checkpoint.init): a BLIP model initialised from a timm/DeiT ViT and a Hugging
Face BERT, on tiny random files written here.

Every mapped tensor equals its source exactly; what the files lack (cross-attention, the [DEC]/[ENC] word-embedding
rows, the ITC projections, the ITM head, ...) keeps the model's own init; momentum copies equal the online weights;
pretraining's decoder still shares all but its self-attention with the encoder; files that do not fit are a
CheckpointError that says why, and leave the model as it was. Expected names and values come from the files' own
layouts (timm's, BERT's), written out here, not from the module under test.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from blip_fast.checkpoint import CheckpointError
from blip_fast.checkpoint.init import abbreviate, init_text, init_vision
from blip_fast.config import tiny_config
from blip_fast.models import build_model

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tiny models: threads only wait for each other

TASKS = ("pretrain", "retrieval", "caption", "vqa")
# where each task model keeps a BERT (a caption model's is its decoder's) and its MLM head
TEXT_PREFIXES = {"pretrain": ("text_encoder", "text_decoder.bert"), "retrieval": ("text_encoder",),
                 "caption": ("text_decoder.bert",), "vqa": ("text_encoder", "text_decoder.bert")}
DECODER = {"pretrain": "text_decoder", "caption": "text_decoder", "vqa": "text_decoder"}
MOMENTUM_TWINS = {"pretrain": ("visual_encoder", "vision_proj", "text_encoder", "text_proj"),
                  "retrieval": ("visual_encoder", "vision_proj", "text_encoder", "text_proj")}
BERT_VOCAB = 30522  # bert-base-uncased's; the models have BLIP's 30,524
BERT_UNUSED = {"bert.embeddings.token_type_embeddings.weight", "bert.pooler.dense.weight", "bert.pooler.dense.bias",
               "cls.seq_relationship.weight", "cls.seq_relationship.bias"}
WIDTH, DEPTH, HEADS, PATCH = 64, 2, 4, 16  # tiny_config's ViT and text transformer: 64 wide, 2 deep, 4 heads


def timm_vit_state(grid: int, width: int = WIDTH, depth: int = DEPTH, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random timm/DeiT ViT state dict (classifier of 10 classes included), for a ``grid`` x ``grid`` patches."""
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, grid * grid + 1, width),
              "patch_embed.proj.weight": (width, 3, PATCH, PATCH), "patch_embed.proj.bias": (width,)}
    for i in range(depth):
        shapes |= {f"blocks.{i}.norm1.weight": (width,), f"blocks.{i}.norm1.bias": (width,),
                   f"blocks.{i}.attn.qkv.weight": (3 * width, width), f"blocks.{i}.attn.qkv.bias": (3 * width,),
                   f"blocks.{i}.attn.proj.weight": (width, width), f"blocks.{i}.attn.proj.bias": (width,),
                   f"blocks.{i}.norm2.weight": (width,), f"blocks.{i}.norm2.bias": (width,),
                   f"blocks.{i}.mlp.fc1.weight": (4 * width, width), f"blocks.{i}.mlp.fc1.bias": (4 * width,),
                   f"blocks.{i}.mlp.fc2.weight": (width, 4 * width), f"blocks.{i}.mlp.fc2.bias": (width,)}
    shapes |= {"norm.weight": (width,), "norm.bias": (width,), "head.weight": (10, width), "head.bias": (10,)}
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def jax_arrays(state: dict[str, torch.Tensor], heads: int = HEADS) -> dict[str, np.ndarray]:
    """``state`` (timm names) as Google's JAX ViT checkpoints lay it out (vit_jax / AugReg ``.npz``)."""
    width = state["cls_token"].shape[-1]
    arrays = {"embedding/kernel": state["patch_embed.proj.weight"].permute(2, 3, 1, 0),  # OIHW -> HWIO
              "embedding/bias": state["patch_embed.proj.bias"], "cls": state["cls_token"],
              "Transformer/posembed_input/pos_embedding": state["pos_embed"],
              "Transformer/encoder_norm/scale": state["norm.weight"],
              "Transformer/encoder_norm/bias": state["norm.bias"],
              "head/kernel": state["head.weight"].T, "head/bias": state["head.bias"]}
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("blocks.")}
    for i in blocks:
        block = f"Transformer/encoderblock_{i}/"
        attention = block + "MultiHeadDotProductAttention_1/"
        qkv_weight = state[f"blocks.{i}.attn.qkv.weight"].chunk(3)
        qkv_bias = state[f"blocks.{i}.attn.qkv.bias"].chunk(3)
        for name, weight, bias in zip(("query", "key", "value"), qkv_weight, qkv_bias, strict=True):
            arrays[f"{attention}{name}/kernel"] = weight.T.reshape(width, heads, width // heads)
            arrays[f"{attention}{name}/bias"] = bias.reshape(heads, width // heads)
        arrays[f"{attention}out/kernel"] = state[f"blocks.{i}.attn.proj.weight"].T.reshape(heads, width // heads, width)
        arrays[f"{attention}out/bias"] = state[f"blocks.{i}.attn.proj.bias"]
        for jax, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            arrays[f"{block}{jax}/scale"] = state[f"blocks.{i}.{ours}.weight"]
            arrays[f"{block}{jax}/bias"] = state[f"blocks.{i}.{ours}.bias"]
        for r in range(2):
            arrays[f"{block}MlpBlock_3/Dense_{r}/kernel"] = state[f"blocks.{i}.mlp.fc{r + 1}.weight"].T
            arrays[f"{block}MlpBlock_3/Dense_{r}/bias"] = state[f"blocks.{i}.mlp.fc{r + 1}.bias"]
    return {name: value.contiguous().numpy() for name, value in arrays.items()}


def random_bert(cls=transformers.BertForPreTraining, seed: int = 0, **sizes) -> transformers.PreTrainedModel:
    """A tiny Hugging Face BERT (BERT's vocabulary, tiny_config's text sizes) with every tensor random: no value
    coincides with a fresh module's (LayerNorm 1/0, zero biases)."""
    config = transformers.BertConfig(**{"vocab_size": BERT_VOCAB, "hidden_size": WIDTH, "num_hidden_layers": DEPTH,
                                        "num_attention_heads": HEADS, "intermediate_size": 128,
                                        "max_position_embeddings": 64, **sizes})
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    return model


def save_legacy(model: transformers.PreTrainedModel, folder) -> None:
    """``model`` as bert-base-uncased's old ``pytorch_model.bin``: LayerNorm ``gamma``/``beta``, the tied LM head
    stored too."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", key)):
             value.clone() for key, value in model.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")
    model.config.to_json_file(folder / "config.json")


def stored_keys(folder) -> set[str]:
    """The tensor names a BERT folder's weights file holds."""
    if (folder / "model.safetensors").is_file():
        return set(load_file(folder / "model.safetensors"))
    return set(torch.load(folder / "pytorch_model.bin", weights_only=True))


def bert_names(model: transformers.PreTrainedModel) -> dict[str, torch.Tensor]:
    """``model``'s tensors under BertModel's own names (``bert.`` dropped), the source of every expectation."""
    return {key.removeprefix("bert."): value for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def vit_files(tmp_path_factory):
    """The same 2 x 2-patch (32 px) timm ViT in every format init_vision reads; and its state."""
    folder = tmp_path_factory.mktemp("vit")
    state = timm_vit_state(grid=2)
    torch.save({"model": state}, folder / "deit.pth")
    torch.save(state, folder / "bare.bin")
    save_file(state, folder / "vit.safetensors")
    (folder / "hub").mkdir()
    save_file(state, folder / "hub" / "model.safetensors")
    np.savez(folder / "vit.npz", **jax_arrays(state))
    files = {"deit_pth": folder / "deit.pth", "bare_bin": folder / "bare.bin", "hub_folder": folder / "hub",
             "safetensors": folder / "vit.safetensors", "jax_npz": folder / "vit.npz"}
    return files, state


@pytest.fixture(scope="module")
def bert_folders(tmp_path_factory):
    """Tiny random BERTs as Hugging Face saves them (safetensors, ``bert.`` prefix, MLM head), as the old
    bert-base-uncased ``pytorch_model.bin`` was, and as a bare ``BertModel`` (no prefix, no MLM head); and each one's
    tensors under BertModel's names."""
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("bert")
    pretraining, bare = random_bert(), random_bert(transformers.BertModel, seed=1)
    pretraining.save_pretrained(root / "safetensors")
    save_legacy(pretraining, root / "legacy_bin")
    bare.save_pretrained(root / "bert_model")
    sources = {"safetensors": bert_names(pretraining), "legacy_bin": bert_names(pretraining),
               "bert_model": bert_names(bare)}
    return {kind: root / kind for kind in sources}, sources


@pytest.fixture(scope="module")
def shared_models():
    """Models shared by the tests that refuse files (a refusal leaves a model as it was: each test checks) and by
    those of the ViT formats (each draws a fresh ViT first)."""
    return {task: build_model(task, tiny_config(32)) for task in ("retrieval", "caption")}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_unchanged_except(model, before, changed) -> None:
    """Every tensor of ``model`` not named in ``changed`` holds its value of ``before`` (the model's own init)."""
    after = model.state_dict()
    kept = [key for key in after if key not in changed]
    assert kept
    for key in kept:
        assert torch.equal(after[key], before[key]), f"{key} changed"


def assert_momentum_copies(model, task) -> None:
    state = model.state_dict()
    for online in MOMENTUM_TWINS.get(task, ()):
        twins = [key for key in state if key.startswith(online + "_m.")]
        assert twins
        for key in twins:
            assert torch.equal(state[key], state[key.replace("_m.", ".", 1)]), key


def twin_keys(model, task) -> set[str]:
    return {key for key in model.state_dict() if key.split(".")[0] in {f"{m}_m" for m in MOMENTUM_TWINS.get(task, ())}}


# ---------------------------------------------------------------- vision


@pytest.mark.parametrize("kind", ["deit_pth", "bare_bin", "safetensors", "hub_folder", "jax_npz"])
def test_every_vit_format_loads_each_tensor_exactly(vit_files, kind, shared_models):
    files, state = vit_files
    model = shared_models["caption"]
    model.visual_encoder.reset_parameters()  # a fresh random ViT: what another format's test loaded is gone
    report = init_vision(model, files[kind])
    ours = model.visual_encoder.state_dict()
    assert set(ours) == set(state) - {"head.weight", "head.bias"}
    for key, value in ours.items():
        assert torch.equal(value, state[key]), key
    assert report.missing == []
    assert sorted(report.unexpected) == (["head/bias", "head/kernel"] if kind == "jax_npz" else ["head.bias",
                                                                                                    "head.weight"])
    assert len(report.loaded) == len(ours)


@pytest.mark.parametrize("task", TASKS)
def test_vit_goes_into_every_task_model_and_its_momentum_copy(vit_files, task):
    files, state = vit_files
    model = build_model(task, tiny_config(32))
    before = snapshot(model)
    init_vision(model, files["deit_pth"])
    vit_keys = {f"visual_encoder.{key}" for key in model.visual_encoder.state_dict()}
    for key in vit_keys:
        assert torch.equal(model.state_dict()[key], state[key.removeprefix("visual_encoder.")]), key
    assert_momentum_copies(model, task)
    # the text side, the projections, the ITM head, the queues: the model's own init
    assert_unchanged_except(model, before, vit_keys | twin_keys(model, task))


def test_what_a_vit_file_lacks_keeps_the_models_init_and_is_reported(tmp_path, shared_models):
    # a ViT with another final norm (timm's global-pool models keep fc_norm instead): loaded without strict, as the
    # original loads DeiT, with the lack said in the report
    state = {key: value for key, value in timm_vit_state(grid=2).items() if not key.startswith("norm.")}
    torch.save(state, tmp_path / "no_norm.pth")
    model = shared_models["caption"]
    model.visual_encoder.reset_parameters()
    before = snapshot(model)
    report = init_vision(model, tmp_path / "no_norm.pth")
    assert report.missing == ["visual_encoder.norm.weight", "visual_encoder.norm.bias"]
    assert report.lines()[1] == "  missing (left at the model's own init): visual_encoder.norm.* (2 tensors)"
    loaded = {f"visual_encoder.{key}" for key in state if not key.startswith("head.")}
    assert_unchanged_except(model, before, loaded)
    assert all(torch.equal(model.state_dict()[key], state[key.removeprefix("visual_encoder.")]) for key in loaded)


def bicubic_positions(pos_embed: torch.Tensor, side: int) -> torch.Tensor:
    """The original ``interpolate_pos_embed``'s resampling, written out: [CLS] kept, the square grid bicubic."""
    held = int((pos_embed.shape[1] - 1) ** 0.5)
    grid = pos_embed[:, 1:].reshape(1, held, held, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, side * side, -1)], dim=1)


@pytest.mark.parametrize("image_size", [32, 96])
def test_position_embeddings_resampled_to_the_models_grid(tmp_path, image_size):
    state = timm_vit_state(grid=4)  # a 64 px file, into 32 px (2 x 2) and 96 px (6 x 6) models
    torch.save({"model": state}, tmp_path / "deit.pth")
    model = build_model("retrieval", tiny_config(image_size))
    report = init_vision(model, tmp_path / "deit.pth")
    side = image_size // PATCH
    expected = bicubic_positions(state["pos_embed"], side)
    assert model.visual_encoder.pos_embed.shape == (1, side * side + 1, WIDTH)
    torch.testing.assert_close(model.visual_encoder.pos_embed.data, expected, rtol=0, atol=1e-6)
    assert torch.equal(model.visual_encoder_m.pos_embed, model.visual_encoder.pos_embed)
    assert torch.equal(model.visual_encoder.cls_token.data, state["cls_token"])
    assert f"pos_embed resampled 4x4 -> {side}x{side} (bicubic)" in report.lines()[0]


def _vit_wider(tmp_path):
    torch.save({"model": timm_vit_state(grid=2, width=96)}, tmp_path / "vit_l.pth")  # a ViT-L into a ViT-B, tiny
    return tmp_path / "vit_l.pth", ["vit_l.pth", r"patch_embed\.proj\.weight: file \(96, 3, 16, 16\) vs model "
                                    r"\(64, 3, 16, 16\)", r"cls_token: file \(1, 1, 96\)"]


def _vit_deeper(tmp_path):
    torch.save({"model": timm_vit_state(grid=2, depth=3)}, tmp_path / "deep.pth")
    return tmp_path / "deep.pth", ["deep.pth", "holds blocks 0-2, but the model's ViT has 2"]


def _vit_distilled(tmp_path):
    torch.save({"model": {**timm_vit_state(grid=2), "dist_token": torch.zeros(1, 1, WIDTH)}}, tmp_path / "d.pth")
    return tmp_path / "d.pth", ["distilled DeiT"]


def _vit_not_square(tmp_path):
    state = timm_vit_state(grid=2)
    state["pos_embed"] = torch.randn(1, 7, WIDTH)
    torch.save(state, tmp_path / "odd.pth")
    return tmp_path / "odd.pth", ["odd.pth", "6 patches is not a square grid"]


def _vit_bert(tmp_path):
    save_file({"bert.embeddings.word_embeddings.weight": torch.randn(8, 4)}, tmp_path / "bert.safetensors")
    return tmp_path / "bert.safetensors", ["holds no ViT weights", "bert.embeddings.word_embeddings.weight"]


def _vit_missing(tmp_path):
    return tmp_path / "nowhere.pth", ["checkpoint not found", "nowhere.pth"]


def _vit_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", ["has no model.safetensors or pytorch_model.bin"]


def _vit_garbage(tmp_path):
    (tmp_path / "garbage.npz").write_bytes(b"not an archive")
    return tmp_path / "garbage.npz", ["cannot read", "garbage.npz", "JAX .npz"]


def _vit_integer(tmp_path):
    state = timm_vit_state(grid=2)
    state["norm.weight"] = torch.ones(WIDTH, dtype=torch.long)
    torch.save(state, tmp_path / "int.pth")
    return tmp_path / "int.pth", ["norm.weight: torch.int64 values for a floating-point weight"]


@pytest.mark.parametrize("make", [_vit_wider, _vit_deeper, _vit_distilled, _vit_not_square, _vit_bert, _vit_missing,
                                  _vit_empty_folder, _vit_garbage, _vit_integer])
def test_vit_files_that_do_not_fit_are_refused_and_change_nothing(tmp_path, make, shared_models):
    path, messages = make(tmp_path)
    model = shared_models["retrieval"]
    before = snapshot(model)
    with pytest.raises(CheckpointError) as raised:
        init_vision(model, path)
    for message in messages:
        assert re.search(message, str(raised.value)), (message, str(raised.value))
    assert_unchanged_except(model, before, set())


# ---------------------------------------------------------------- text


def crossattention_keys(model, prefix) -> list[str]:
    pattern = re.compile(rf"{re.escape(prefix)}\.encoder\.layer\.\d+\.crossattention\.")
    return [key for key in model.state_dict() if pattern.match(key)]


@pytest.mark.parametrize(("task", "kind"), [(task, "safetensors") for task in TASKS]
                         + [("pretrain", "legacy_bin"), ("vqa", "bert_model")])
def test_bert_goes_into_every_text_transformer(bert_folders, task, kind):
    folders, sources = bert_folders
    bert = sources[kind]
    model = build_model(task, tiny_config(32))
    decoder = DECODER.get(task)
    if decoder:  # an LM bias other than 0 where [DEC] and [ENC] will be: init_text sets 0 there, as 4.15 padded it
        model.get_submodule(decoder).cls.predictions.bias.data.fill_(5.0)
    before = snapshot(model)
    report = init_text(model, folders[kind])
    state = model.state_dict()
    changed = set()
    for prefix in TEXT_PREFIXES[task]:
        for name, value in bert.items():
            if not name.startswith(("embeddings.", "encoder.")) or name == "embeddings.token_type_embeddings.weight":
                continue
            key = f"{prefix}.{name}"
            changed.add(key)
            if name == "embeddings.word_embeddings.weight":  # BERT's rows, then [DEC] and [ENC] as the model drew them
                assert torch.equal(state[key][:BERT_VOCAB], value), key
                assert torch.equal(state[key][BERT_VOCAB:], before[key][BERT_VOCAB:]), key
            else:
                assert torch.equal(state[key], value), key
    head = {name: value for name, value in bert.items() if name.startswith("cls.predictions.")}
    if decoder and head:  # BertLMHeadModel.from_pretrained's MLM head: BERT's
        for name in ("transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
                     "transform.LayerNorm.bias"):
            key = f"{decoder}.cls.predictions.{name}"
            assert torch.equal(state[key], head[f"cls.predictions.{name}"]), key
            changed.add(key)
        bias = state[f"{decoder}.cls.predictions.bias"]
        assert torch.equal(bias[:BERT_VOCAB], head["cls.predictions.bias"])
        assert torch.equal(bias[BERT_VOCAB:], torch.zeros(2))
        changed |= {f"{decoder}.cls.predictions.bias", f"{decoder}.cls.predictions.decoder.bias"}
    if decoder:  # the LM head is the word embeddings
        lm_head = model.text_decoder.cls.predictions.decoder
        assert lm_head.weight is model.text_decoder.bert.embeddings.word_embeddings.weight
        changed.add(f"{decoder}.cls.predictions.decoder.weight")
    assert_momentum_copies(model, task)
    # cross-attention, the ViT, ITC projections, ITM head, queues, temperature: the model's own init
    assert_unchanged_except(model, before, changed | twin_keys(model, task))

    # the report: what is fresh (each tensor by its first name; pretraining's decoder shares the encoder's)
    owners = ("text_encoder",) if task == "pretrain" else TEXT_PREFIXES[task]
    expected_missing = [key for prefix in owners for key in crossattention_keys(model, prefix)]
    expected_missing += [f"{prefix}.embeddings.word_embeddings.weight[{BERT_VOCAB}:30524]" for prefix in owners]
    if decoder and not head:
        expected_missing += [f"{decoder}.cls.predictions.{name}" for name in (
            "bias", "transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
            "transform.LayerNorm.bias")]
    assert sorted(report.missing) == sorted(expected_missing)
    unused = BERT_UNUSED if kind != "bert_model" else {key.removeprefix("bert.") for key in BERT_UNUSED
                                                       if key.startswith("bert.")}
    if not decoder:  # the file's MLM head, the tied copies an old file stores included
        unused = unused | {key for key in stored_keys(folders[kind]) if key.startswith("cls.predictions.")}
    assert set(report.unexpected) == unused
    tensors = model.state_dict(keep_vars=True)
    assert len(report.loaded) == len({id(tensors[key]) for key in changed})


def test_pretraining_decoder_shares_all_but_self_attention(bert_folders):
    folders, _ = bert_folders
    model = build_model("pretrain", tiny_config(32))
    report = init_text(model, folders["safetensors"])
    encoder = model.text_encoder.state_dict(keep_vars=True)
    decoder = model.text_decoder.bert.state_dict(keep_vars=True)
    assert set(encoder) == set(decoder)
    for key, tensor in decoder.items():
        if ".attention." in key:  # its own causal self-attention, loaded from the same BERT layer
            assert tensor is not encoder[key] and torch.equal(tensor, encoder[key]), key
        else:
            assert tensor is encoder[key], key
    assert model.text_decoder.cls.predictions.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight
    assert ("text_decoder.bert shares all but text_decoder.bert.encoder.layer.*.attention.* (20 tensors, * = 0,1) "
            "with text_encoder") in report.lines()[0]


def small_vocabulary_bert(**sizes) -> transformers.PreTrainedModel:
    """A BERT for the refusals: a vocabulary of 100 (smaller files, faster tests), the sizes asked."""
    return random_bert(**{"vocab_size": 100, **sizes})


def _bert_folder(tmp_path, name, model=None, config_edit=None, weights=True):
    folder = tmp_path / name
    (model or small_vocabulary_bert()).save_pretrained(folder)
    if not weights:
        (folder / "model.safetensors").unlink()
    if config_edit:
        config = json.loads((folder / "config.json").read_text())
        config_edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _bert_narrower(tmp_path):
    folder = _bert_folder(tmp_path, "narrow", small_vocabulary_bert(hidden_size=32))
    return folder, ["narrow", "hidden_size 32 \\(the model's 64\\)"]


def _bert_deeper(tmp_path):
    folder = _bert_folder(tmp_path, "deep", small_vocabulary_bert(num_hidden_layers=3))
    return folder, ["num_hidden_layers 3 \\(the model's 2\\)"]


def _bert_layers_unlike_config(tmp_path):
    folder = _bert_folder(tmp_path, "liar", small_vocabulary_bert(num_hidden_layers=3),
                          config_edit=lambda config: config.update(num_hidden_layers=2))
    return folder, ["holds encoder layers 0-2, but the model's text transformer has 2"]


def _bert_larger_vocabulary(tmp_path):
    return _bert_folder(tmp_path, "vocab", random_bert(vocab_size=30600)), ["vocab_size 30600 \\(the model's 30524"]


def _not_bert(tmp_path):
    folder = _bert_folder(tmp_path, "roberta", config_edit=lambda config: config.update(model_type="roberta"))
    return folder, ["holds a 'roberta' model, not BERT"]


def _bert_without_weights(tmp_path):
    return _bert_folder(tmp_path, "empty", weights=False), ["has no model.safetensors or pytorch_model.bin"]


def _bert_without_config(tmp_path):
    (tmp_path / "no_config").mkdir()
    return tmp_path / "no_config", ["not a Hugging Face BERT folder: no config.json"]


def _bert_file(tmp_path):
    folder = _bert_folder(tmp_path, "file")
    return folder / "model.safetensors", ["is a file; init_text takes a Hugging Face BERT folder"]


def _bert_missing(tmp_path):
    return tmp_path / "nowhere", ["BERT folder not found"]


def _bert_untied_head(tmp_path):
    save_legacy(small_vocabulary_bert(), tmp_path / "untied")
    state = torch.load(tmp_path / "untied" / "pytorch_model.bin", weights_only=True)
    state["cls.predictions.decoder.weight"] = torch.randn_like(state["cls.predictions.decoder.weight"])
    torch.save(state, tmp_path / "untied" / "pytorch_model.bin")
    return tmp_path / "untied", ["bert.embeddings.word_embeddings.weight and cls.predictions.decoder.weight differ, "
                                 "but the model ties them"]


@pytest.mark.parametrize("make", [_bert_narrower, _bert_deeper, _bert_layers_unlike_config, _bert_larger_vocabulary,
                                  _not_bert, _bert_without_weights, _bert_without_config, _bert_file, _bert_missing,
                                  _bert_untied_head])
def test_bert_folders_that_do_not_fit_are_refused_and_change_nothing(tmp_path, make, shared_models):
    transformers.logging.set_verbosity_error()
    folder, messages = make(tmp_path)
    model = shared_models["caption"]
    before = snapshot(model)
    with pytest.raises(CheckpointError) as raised:
        init_text(model, folder)
    for message in messages:
        assert re.search(message, str(raised.value)), (message, str(raised.value))
    assert_unchanged_except(model, before, set())


def test_models_without_the_part_are_a_type_error(vit_files):
    files, _ = vit_files
    with pytest.raises(TypeError, match="no visual_encoder"):
        init_vision(torch.nn.Linear(2, 2), files["deit_pth"])
    with pytest.raises(TypeError, match="no text transformer"):
        init_text(torch.nn.Linear(2, 2), files["hub_folder"])


# ---------------------------------------------------------------- the report


def test_report_is_three_lines_and_abbreviates_layers(bert_folders, vit_files):
    folders, _ = bert_folders
    model = build_model("vqa", tiny_config(32))
    lines = init_text(model, folders["safetensors"]).lines()
    assert len(lines) == 3 and not any("\n" in line for line in lines)
    assert lines[1] == ("  missing (left at the model's own init): text_encoder.encoder.layer.*.crossattention.* "
                        "(20 tensors, * = 0,1), text_decoder.bert.encoder.layer.*.crossattention.* (20 tensors, "
                        "* = 0,1), text_encoder.embeddings.word_embeddings.weight[30522:30524], "
                        "text_decoder.bert.embeddings.word_embeddings.weight[30522:30524]")
    assert lines[2] == ("  unexpected (in the file, not used): bert.embeddings.token_type_embeddings.weight, "
                        "bert.pooler.dense.* (2 tensors), cls.seq_relationship.* (2 tensors)")
    assert "vocabulary 30522 -> 30524 tokens" in lines[0]
    vision = init_vision(build_model("pretrain", tiny_config(32)), vit_files[0]["deit_pth"]).lines()
    assert vision[1].endswith("missing (left at the model's own init): none")
    assert "momentum copies taken (visual_encoder_m, vision_proj_m, text_encoder_m, text_proj_m)" in vision[0]


def test_abbreviate_groups_by_layer_and_caps_the_groups():
    twelve = [f"text_encoder.encoder.layer.{i}.crossattention.{name}" for i in range(12)
              for name in ("self.query.weight", "self.query.bias", "output.LayerNorm.weight")]
    assert abbreviate(twelve) == "text_encoder.encoder.layer.*.crossattention.* (36 tensors, * = 0-11)"
    assert abbreviate(["temp"]) == "temp"
    assert abbreviate([]) == "none"
    many = [f"module{i}.weight" for i in range(11)] + [f"module{i}.bias" for i in range(11)]
    assert abbreviate(many).endswith(", ... and 3 more groups (6 tensors)")
    assert abbreviate(many).startswith("module0.* (2 tensors), module1.* (2 tensors)")


def test_init_writes_in_place_and_keeps_the_models_tensors(bert_folders):
    # the optimizer, FSDP and the compiled blocks hold the model's tensors: init must not replace them
    folders, _ = bert_folders
    model = build_model("pretrain", tiny_config(32))
    tensors = model.state_dict(keep_vars=True)
    init_text(model, folders["safetensors"])
    assert all(model.state_dict(keep_vars=True)[key] is tensor for key, tensor in tensors.items())
