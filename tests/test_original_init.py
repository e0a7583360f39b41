"""init_vision / init_text against the original's own initialisation (blip-ci's ``BLIP_Pretrain.__init__``) on the
same files.

``benchmarks/original_blip.py``'s ``build_original_pretrain_from_files`` runs the original constructor unchanged,
its downloads answered by the tiny files written here: DeiT-B's ``torch.hub`` download (a torch file) or ViT-L's
``.npz`` (through timm's ``load_custom_pretrained`` into the original's ``_load_weights``); ``bert-base-uncased``
through transformers 4.15's ``from_pretrained`` (``from_pretrained_4_15``), then its own
``resize_token_embeddings``, ``copy_params`` and ``tie_encoder_decoder_weights``. Its ViT is its own
``VisionTransformer`` at the tiny shape (64 wide, 2 blocks).

The original is built twice, with two seeds: what differs between the builds it drew at random, and with the
constant inits of its fresh modules (LayerNorm 1/0, zero biases) that is what it did not take from the files. Within
the ViT and the text transformers that set is exactly what our reports call missing (with its other names and its
momentum copies), and every other tensor equals the original's exactly; the same names share one tensor in both.
"""

import contextlib
import io
import re
import sys

import numpy as np
import pytest
import torch
import transformers
from original_checks import needs_original, original_blip

from blip_fast.checkpoint.init import init_text, init_vision
from blip_fast.config import tiny_config
from blip_fast.models import BlipCaption, BlipPretrain

# tiny models: threads only wait for each other
pytestmark = [needs_original, pytest.mark.usefixtures("one_intra_op_thread")]

WIDTH, DEPTH, HEADS = 64, 2, 4  # tiny_config's ViT and text transformer
# the model parts the two files initialise, and the momentum copies of the online ones
INITIALISED = ("visual_encoder", "visual_encoder_m", "text_encoder", "text_encoder_m", "text_decoder")
MOMENTUM_TWIN = {"visual_encoder": "visual_encoder_m", "text_encoder": "text_encoder_m"}


def original_vit(image_size: int, depth: int = DEPTH) -> torch.nn.Module:
    """The original's own ViT class (``blip.models.vit``) at the tiny shape."""
    original_blip.load_original()
    return sys.modules["blip.models.vit"].VisionTransformer(img_size=image_size, patch_size=16, embed_dim=WIDTH,
                                                            depth=depth, num_heads=HEADS)


def deit_state(image_size: int) -> dict[str, torch.Tensor]:
    """A DeiT-style state dict, every value random: the original ViT's tensors and a 10-class head."""
    vit = original_vit(image_size)
    with torch.no_grad():
        for param in vit.parameters():
            param.normal_()
    return {**{key: value.clone() for key, value in vit.state_dict().items()},
            "head.weight": torch.randn(10, WIDTH), "head.bias": torch.randn(10)}


def jax_arrays(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``state`` (timm names) in the layout of Google's JAX ViT checkpoints, which the original's ``_load_weights``
    reads: kernels (in, out), attention kernels per head."""
    head_dim = WIDTH // HEADS
    arrays = {"embedding/kernel": state["patch_embed.proj.weight"].permute(2, 3, 1, 0),
              "embedding/bias": state["patch_embed.proj.bias"], "cls": state["cls_token"],
              "Transformer/posembed_input/pos_embedding": state["pos_embed"],
              "Transformer/encoder_norm/scale": state["norm.weight"],
              "Transformer/encoder_norm/bias": state["norm.bias"], "head/kernel": state["head.weight"].T,
              "head/bias": state["head.bias"]}
    for i in range(DEPTH):
        block = f"Transformer/encoderblock_{i}/"
        attention, ours = block + "MultiHeadDotProductAttention_1/", f"blocks.{i}."
        for name, weight, bias in zip(("query", "key", "value"), state[ours + "attn.qkv.weight"].chunk(3),
                                      state[ours + "attn.qkv.bias"].chunk(3), strict=True):
            arrays[f"{attention}{name}/kernel"] = weight.T.reshape(WIDTH, HEADS, head_dim)
            arrays[f"{attention}{name}/bias"] = bias.reshape(HEADS, head_dim)
        arrays[attention + "out/kernel"] = state[ours + "attn.proj.weight"].T.reshape(HEADS, head_dim, WIDTH)
        arrays[attention + "out/bias"] = state[ours + "attn.proj.bias"]
        for jax, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            arrays[f"{block}{jax}/scale"], arrays[f"{block}{jax}/bias"] = (state[f"{ours}{norm}.weight"],
                                                                            state[f"{ours}{norm}.bias"])
        for r in range(2):
            arrays[f"{block}MlpBlock_3/Dense_{r}/kernel"] = state[f"{ours}mlp.fc{r + 1}.weight"].T
            arrays[f"{block}MlpBlock_3/Dense_{r}/bias"] = state[f"{ours}mlp.fc{r + 1}.bias"]
    return {name: value.contiguous().numpy() for name, value in arrays.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 32 px DeiT file and the same ViT as a JAX .npz; a tiny random BERT (BERT's 30,522 tokens) as Hugging Face
    saves it today (safetensors) and as bert-base-uncased's old ``pytorch_model.bin`` (LayerNorm gamma/beta)."""
    root = tmp_path_factory.mktemp("original_init")
    vit = deit_state(32)
    torch.save({"model": vit}, root / "deit.pth")
    np.savez(root / "vit.npz", **jax_arrays(vit))
    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(vocab_size=30522, hidden_size=WIDTH, num_hidden_layers=DEPTH,
                                     num_attention_heads=HEADS, intermediate_size=128, max_position_embeddings=64)
    bert = transformers.BertForPreTraining(config)
    with torch.no_grad():
        for param in bert.parameters():
            param.normal_()
    bert.save_pretrained(root / "safetensors")
    (root / "legacy_bin").mkdir()
    torch.save({re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", key)):
                value.clone() for key, value in bert.state_dict().items()}, root / "legacy_bin" / "pytorch_model.bin")
    config.to_json_file(root / "legacy_bin" / "config.json")
    return {"deit_pth": root / "deit.pth", "jax_npz": root / "vit.npz", "safetensors": root / "safetensors",
            "legacy_bin": root / "legacy_bin"}


def rows_that_differ(first: torch.Tensor, second: torch.Tensor) -> tuple[int, int] | None:
    """The (start, stop) of the rows in which two builds' values differ, None if none; whole tensors as (0, rows)."""
    if first.dim() == 0:  # the temperature
        return (0, 1) if first != second else None
    differ = (first != second).reshape(first.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
    if not differ:
        return None
    assert differ == list(range(differ[0], differ[-1] + 1)), "drawn rows not contiguous"
    return differ[0], differ[-1] + 1


def originals_fresh(builds: list[dict], keys: list[str]) -> dict[str, tuple[int, int]]:
    """What the original did not take from the files: rows drawn at random (they differ between the two builds)
    and tensors of one constant value (a fresh LayerNorm's 1s and 0s, a fresh Linear's zero bias; every value the
    files hold is random)."""
    fresh = {}
    for key in keys:
        first, second = builds[0][key], builds[1][key]
        rows = rows_that_differ(first, second)
        if rows is None and (first == first.flatten()[0]).all():
            rows = (0, first.shape[0] if first.dim() else 1)
        if rows is not None:
            fresh[key] = rows
    return fresh


def reported_missing(reports, model) -> dict[str, tuple[int, int]]:
    """Our reports' missing tensors under every name they have in ``model``, and their momentum copies: whole
    tensors as (0, rows), ``key[a:b]`` as (a, b)."""
    tensors = model.state_dict(keep_vars=True)
    names: dict[int, list[str]] = {}
    for key, tensor in tensors.items():
        names.setdefault(id(tensor), []).append(key)
    missing = {}
    for entry in (entry for report in reports for entry in report.missing):
        key, start, stop = re.fullmatch(r"(.+?)(?:\[(\d+):(\d+)\])?", entry).groups()
        rows = (int(start), int(stop)) if start else (0, tensors[key].shape[0] if tensors[key].dim() else 1)
        for name in names[id(tensors[key])]:
            missing[name] = rows
            part, rest = name.split(".", 1)
            if part in MOMENTUM_TWIN:
                missing[f"{MOMENTUM_TWIN[part]}.{rest}"] = rows
    return missing


def tied_groups(state: dict, keys: list[str]) -> set[frozenset[str]]:
    """``keys`` grouped by the tensor they name."""
    groups: dict[int, set[str]] = {}
    for key in keys:
        groups.setdefault(id(state[key]), set()).add(key)
    return {frozenset(group) for group in groups.values()}


@pytest.mark.parametrize(("vit_kind", "bert_kind"), [("deit_pth", "safetensors"), ("jax_npz", "legacy_bin")])
def test_same_initialisation_as_the_original(files, vit_kind, bert_kind):
    config = tiny_config(32)
    builds = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        original = original_blip.build_original_pretrain_from_files(config, files[vit_kind], files[bert_kind])
        builds.append(original.state_dict(keep_vars=True))
    ours = BlipPretrain(config)
    reports = [init_vision(ours, files[vit_kind]), init_text(ours, files[bert_kind])]
    state = ours.state_dict(keep_vars=True)
    initialised = [key for key in state if key.split(".")[0] in INITIALISED]
    assert set(builds[0]) - set(state) == {f"{m}.embeddings.position_ids"
                                           for m in ("text_encoder", "text_encoder_m", "text_decoder.bert")}

    missing = reported_missing(reports, ours)
    assert missing and originals_fresh(builds, initialised) == missing
    for key in initialised:
        start, stop = missing.get(key, (0, 0))
        ours_value, original_value = state[key].detach(), builds[0][key].detach()
        if ours_value.dim():
            ours_value = torch.cat([ours_value[:start], ours_value[stop:]])
            original_value = torch.cat([original_value[:start], original_value[stop:]])
        elif stop:
            continue
        assert torch.equal(ours_value, original_value), key
    assert tied_groups(state, initialised) == tied_groups(builds[0], initialised)
    # the rest neither file initialises, in the original either: the ITC projections, the ITM head, the queues (all
    # drawn), the temperature and the queue pointer (constants)
    rest = [key for key in state if key not in initialised]
    assert set(originals_fresh(builds, rest)) == set(rest)
    assert {key.split(".")[0] for key in rest} == {"vision_proj", "text_proj", "itm_head", "temp", "vision_proj_m",
                                                   "text_proj_m", "image_queue", "text_queue", "queue_ptr"}


def test_the_originals_momentum_encoder_starts_from_its_encoder_before_the_tie(files):
    # copy_params runs before the decoder is loaded and tied: the online encoder's cross-attention and [DEC]/[ENC]
    # rows are then the decoder's draws, the momentum encoder keeps the encoder's own; ours copies after both
    original = original_blip.build_original_pretrain_from_files(tiny_config(32), files["deit_pth"],
                                                                files["safetensors"])
    online, momentum = original.text_encoder.state_dict(), original.text_encoder_m.state_dict()
    query = "encoder.layer.0.crossattention.self.query.weight"
    assert not torch.equal(online[query], momentum[query])
    words = "embeddings.word_embeddings.weight"
    assert torch.equal(online[words][:30522], momentum[words][:30522])
    assert not torch.equal(online[words][30522:], momentum[words][30522:])


@pytest.mark.parametrize("image_size", [32, 96])
def test_position_embeddings_resampled_as_the_originals_interpolate_pos_embed(tmp_path, image_size):
    state = deit_state(64)  # 4 x 4 patches, into 2 x 2 and 6 x 6
    torch.save({"model": state}, tmp_path / "deit.pth")
    ours = BlipCaption(tiny_config(image_size))
    init_vision(ours, tmp_path / "deit.pth")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the resize
        expected = sys.modules["blip.models.vit"].interpolate_pos_embed(state["pos_embed"], original_vit(image_size, 1))
    assert torch.equal(ours.visual_encoder.pos_embed.data, expected)


def test_the_originals_pretraining_loads_deit_at_deits_own_size_only(tmp_path, files):
    # BLIP_Pretrain loads DeiT-B with load_state_dict(strict=False) and no interpolate_pos_embed: at another image
    # size than the file's, its __init__ fails; init_vision resamples
    torch.save({"model": deit_state(64)}, tmp_path / "deit.pth")
    with pytest.raises(RuntimeError, match="size mismatch for pos_embed"):
        original_blip.build_original_pretrain_from_files(tiny_config(32), tmp_path / "deit.pth", files["safetensors"])
