"""The original BLIP models (Salesforce ``models/blip_pretrain.py`` and the fine-tuning models), run unchanged as
a baseline and as the reference of tests/test_original_*.py.

The ``blip-ci`` package (``pip install --no-deps blip-ci==0.0.5``; ``make setup-test`` installs it) packages the
original code as the importable package ``blip``. It was written for timm 0.4.12, fairscale 0.4.4 and
transformers 4.15; on today's libraries a few names it imports are gone. :func:`load_original_module` imports
``blip.models.<name>`` (:func:`load_original`: ``blip_pretrain``) with shims for exactly those names, each checked
against what is installed: a name the installed library still has is used as it is, a missing one is supplied for
the import and taken away again afterwards (:data:`SHIMS`). With timm absent (CI) the few timm names the
original ``vit.py`` imports come from torch; with timm 1.x installed only what 1.x lacks is shimmed.
transformers 5 also dropped four ``PreTrainedModel`` methods the original's ``med.py`` relies on
(:data:`METHOD_SHIMS`): ``invert_attention_mask`` and ``get_head_mask``, and the 4.x
``init_weights``/``tie_weights``, without which the decoder's LM head would not be tied to its word
embeddings (and ``init_weights`` fails outright); they are set on the original's own
``BertPreTrainedModel`` (and on NLVR2's, in ``nlvr_encoder.py``), and only when the installed ``PreTrainedModel``
lacks them. transformers 5's ``PreTrainedModel`` has no ``generate`` either, which the original's captioning and
VQA ``generate`` call: that is not shimmed, so they fail.

:func:`build_original_pretrain` builds ``BLIP_Pretrain`` from a :class:`blip_fast.config.BlipConfig`
without touching the network, and so do :func:`build_original_retrieval` (``BLIP_Retrieval``),
:func:`build_original_caption` (``BLIP_Decoder``), :func:`build_original_vqa` (``BLIP_VQA``) and
:func:`build_original_nlvr` (``BLIP_NLVR``). The original pretraining constructor downloads three things, the
fine-tuning ones only the tokenizer; here:

- DeiT-B weights for the ViT (``torch.hub.load_state_dict_from_url``) and, for ViT-L, the ImageNet-21k
  weights (timm ``load_custom_pretrained``): nothing is downloaded, the ViT keeps its random init;
- BERT-base weights (``BertModel.from_pretrained('bert-base-uncased')``, twice): the text encoder
  and decoder are built from the config (``cls(config)``), randomly initialised;
- the tokenizer (``init_tokenizer``: ``BertTokenizer.from_pretrained('bert-base-uncased')``): built
  from the vocabulary shipped in ``blip_fast/text`` with the original's two added tokens
  (:func:`offline_tokenizer`).

:func:`build_original_pretrain_from_files` builds ``BLIP_Pretrain`` initialised as its own ``__init__`` initialises
pretraining, its downloads answered by local files (a DeiT or JAX ViT file; a BERT folder, read as transformers 4.15's
``from_pretrained`` read ``bert-base-uncased``: :func:`from_pretrained_4_15`), the reference of
tests/test_original_init.py.

Everything the step does is left as it is, because it is the baseline being measured: captions are
tokenized inside ``forward`` (padded to 30), hard negatives are drawn one row at a time with
``torch.multinomial(...).item()``, the momentum update is a Python loop over parameters. One change:
``concat_all_gather`` (of pretraining and retrieval) needs an initialised ``torch.distributed`` group. When none
is initialised it is replaced by what it computes in a one-process group (a copy of the tensor into a fresh
buffer, then ``cat``) rather than initialising a gloo/NCCL group: a group would need a rendezvous address, and
would stay initialised for the rest of the process, where blip_fast's own code (its
``concat_all_gather``, the data stream's rank) reads ``torch.distributed.is_initialized()``. With a
group initialised by the caller the original function runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import inspect
import io
import json
import math
import sys
import tempfile
import types
import warnings
from pathlib import Path

import torch
from torch import nn

from blip_fast.config import BlipConfig
from blip_fast.text.tokenizer import VOCAB_FILE

PACKAGE = "blip-ci"
VERSION = "0.0.5"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={VERSION}"


class OriginalUnavailable(ImportError):
    """The ``blip-ci`` package (the original BLIP code) is not installed."""


def is_available() -> bool:
    try:
        importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# ---------------------------------------------------------------- shims: timm 0.4.12


def _to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


class PatchEmbed(nn.Module):
    """timm 0.4.12 ``PatchEmbed``: a stride-``patch_size`` convolution, flattened to (B, N, C)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True):
        super().__init__()
        img_size, patch_size = _to_2tuple(img_size), _to_2tuple(patch_size)
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        _, _, height, width = x.shape
        assert (height, width) == self.img_size, f"input size ({height}*{width}) doesn't match model {self.img_size}"
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C)
        return self.norm(x)


class DropPath(nn.Module):
    """timm 0.4.12 ``DropPath``: stochastic depth per sample (ViT-L's drop-path 0.1)."""

    def __init__(self, drop_prob=None):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.drop_prob or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        mask = (keep_prob + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep_prob) * mask


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    """timm 0.4.12 ``trunc_normal_`` (torch's is the same code, taken from timm)."""
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


def named_apply(fn, module, name="", depth_first=True, include_root=False):
    """timm 0.4.12 ``named_apply``: ``fn(module=..., name=...)`` over the module tree."""
    if not depth_first and include_root:
        fn(module=module, name=name)
    for child_name, child in module.named_children():
        child_name = f"{name}.{child_name}" if name else child_name
        named_apply(fn=fn, module=child, name=child_name, depth_first=depth_first, include_root=True)
    if depth_first and include_root:
        fn(module=module, name=name)
    return module


def adapt_input_conv(in_chans, conv_weight):
    """timm 0.4.12 ``adapt_input_conv``: the patch-embedding weight of a checkpoint for ``in_chans`` channels."""
    dtype, conv_weight = conv_weight.dtype, conv_weight.float()
    out_c, in_c, kh, kw = conv_weight.shape
    if in_chans == 1:
        if in_c > 3:
            conv_weight = conv_weight.reshape(out_c, in_c // 3, 3, kh, kw).sum(dim=2)
        else:
            conv_weight = conv_weight.sum(dim=1, keepdim=True)
    elif in_chans != 3:
        if in_c != 3:  # timm refuses this too: no rule maps a non-RGB patch embedding to another channel count
            raise ValueError(f"adapt_input_conv: cannot adapt a {in_c}-channel patch embedding to {in_chans} channels")
        conv_weight = conv_weight.repeat(1, int(math.ceil(in_chans / 3)), 1, 1)[:, :in_chans] * (3 / float(in_chans))
    return conv_weight.to(dtype)


def _cfg(url="", **kwargs):
    """timm 0.4.12 ``vision_transformer._cfg``: a pretrained-weights description (imported, unused)."""
    return {"url": url, "num_classes": 1000, "input_size": (3, 224, 224), "first_conv": "patch_embed.proj",
            "classifier": "head", **kwargs}


def register_model(fn):
    """timm 0.4.12 ``register_model``; the original registers nothing, so a pass-through."""
    return fn


def download_cached_file(url, check_hash=True, progress=False):
    """timm 0.4.12 ``hub.download_cached_file``: used only by ``blip.load_checkpoint``, never here."""
    raise RuntimeError(f"original_blip: no downloads ({url})")


def load_custom_pretrained(model, default_cfg=None, load_fn=None, progress=False, check_hash=False):
    """timm ``load_custom_pretrained`` (ViT-L's ImageNet-21k weights): no download, the random init stays."""


# ---------------------------------------------------------------- shims: fairscale 0.4.4, transformers 4.15


def checkpoint_wrapper(module, offload_to_cpu=False):
    """fairscale ``checkpoint_wrapper``: recompute ``module``'s forward in backward (``vit_grad_ckpt``, off in
    pretraining), here with ``torch.utils.checkpoint``."""
    forward = module.forward

    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed
    return module


def find_pruneable_heads_and_indices(heads, n_heads, head_size, already_pruned_heads):
    """transformers 4.15 ``find_pruneable_heads_and_indices`` (used by ``prune_heads``, never in the step)."""
    mask = torch.ones(n_heads, head_size)
    heads = set(heads) - already_pruned_heads
    for head in heads:
        mask[head - sum(1 if h < head else 0 for h in already_pruned_heads)] = 0
    mask = mask.view(-1).contiguous().eq(1)
    return heads, torch.arange(len(mask))[mask].long()


def invert_attention_mask(self, encoder_attention_mask):
    """transformers 4.15 ``ModuleUtilsMixin.invert_attention_mask``: 1/0 keep mask -> additive 0/-1e9 (fp32)."""
    if encoder_attention_mask.dim() == 3:
        extended = encoder_attention_mask[:, None, :, :]
    if encoder_attention_mask.dim() == 2:
        extended = encoder_attention_mask[:, None, None, :]
    extended = extended.to(dtype=self.dtype)  # fp16 compatibility
    if self.dtype == torch.float16:
        return (1.0 - extended) * -1e4
    if self.dtype == torch.float32:
        return (1.0 - extended) * -1e9
    raise ValueError(f"{self.dtype} not recognized. `dtype` should be set to either `torch.float32` or `torch.float16`")


def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
    """transformers 4.15 ``ModuleUtilsMixin.get_head_mask``: ``None`` per layer, or the mask as
    (layers, batch, heads, query, key) broadcastable scales -- (heads,) for every layer or (layers, heads)."""
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    else:
        raise ValueError(f"head_mask must be (heads,) or (layers, heads); got {tuple(head_mask.shape)}")
    head_mask = head_mask.to(dtype=self.dtype)
    return head_mask.unsqueeze(-1) if is_attention_chunked else head_mask


def init_weights(self):
    """transformers 4.15 ``PreTrainedModel.init_weights``: ``_init_weights`` on every module, then tie."""
    if getattr(self.config, "pruned_heads", None):
        self.prune_heads(self.config.pruned_heads)
    self.apply(self._init_weights)
    self.tie_weights()


def tie_weights(self, *args, **kwargs):
    """transformers 4.15 ``PreTrainedModel.tie_weights``: the LM head's weight is the word embedding's
    (``config.tie_word_embeddings``, default true), as in the original's decoder."""
    output_embeddings, input_embeddings = self.get_output_embeddings(), self.get_input_embeddings()
    if output_embeddings is not None and getattr(self.config, "tie_word_embeddings", True):
        output_embeddings.weight = input_embeddings.weight
        if getattr(output_embeddings, "bias", None) is not None:
            output_embeddings.bias.data = nn.functional.pad(
                output_embeddings.bias.data, (0, output_embeddings.weight.shape[0] - output_embeddings.bias.shape[0]))
        if hasattr(output_embeddings, "out_features") and hasattr(input_embeddings, "num_embeddings"):
            output_embeddings.out_features = input_embeddings.num_embeddings


def _pytorch_utils(name):
    return lambda: getattr(importlib.import_module("transformers.pytorch_utils"), name)


# (module, name, what supplies it when the installed library lacks it). Only what is missing gets
# shimmed; the comment says what each replaces.
SHIMS = [
    # timm 0.4.12 timm.models.vision_transformer._cfg (timm absent)
    ("timm.models.vision_transformer", "_cfg", lambda: _cfg),
    # timm 0.4.12 timm.models.vision_transformer.PatchEmbed (timm absent)
    ("timm.models.vision_transformer", "PatchEmbed", lambda: PatchEmbed),
    # timm 0.4.12 timm.models.registry.register_model (timm absent)
    ("timm.models.registry", "register_model", lambda: register_model),
    # timm 0.4.12 timm.models.layers.trunc_normal_ (timm absent; timm >= 0.9 moved layers to timm.layers)
    ("timm.models.layers", "trunc_normal_", lambda: trunc_normal_),
    # timm 0.4.12 timm.models.layers.DropPath (as above)
    ("timm.models.layers", "DropPath", lambda: DropPath),
    # timm 0.4.12 timm.models.helpers.named_apply (timm absent; timm >= 0.9 moved it to timm.models._manipulate)
    ("timm.models.helpers", "named_apply", lambda: named_apply),
    # timm 0.4.12 timm.models.helpers.adapt_input_conv (as above)
    ("timm.models.helpers", "adapt_input_conv", lambda: adapt_input_conv),
    # timm 0.4.12 timm.models.hub.download_cached_file, imported by blip/models/blip.py (timm absent)
    ("timm.models.hub", "download_cached_file", lambda: download_cached_file),
    # fairscale 0.4.4 checkpoint_wrapper (fairscale absent)
    ("fairscale.nn.checkpoint.checkpoint_activations", "checkpoint_wrapper", lambda: checkpoint_wrapper),
    # transformers 4.15 modeling_utils.apply_chunking_to_forward (transformers 5 has it in pytorch_utils)
    ("transformers.modeling_utils", "apply_chunking_to_forward", _pytorch_utils("apply_chunking_to_forward")),
    # transformers 4.15 modeling_utils.prune_linear_layer (transformers 5 has it in pytorch_utils)
    ("transformers.modeling_utils", "prune_linear_layer", _pytorch_utils("prune_linear_layer")),
    # transformers 4.15 modeling_utils.find_pruneable_heads_and_indices (removed in transformers 5)
    ("transformers.modeling_utils", "find_pruneable_heads_and_indices", lambda: find_pruneable_heads_and_indices),
]


def _tying_by_mapping(pretrained_model) -> bool:
    """transformers >= 5 ties only what a class declares in ``_tied_weights_keys``, and its ``init_weights``
    needs ``post_init()``, which the original's models never call."""
    return "recompute_mapping" in inspect.signature(pretrained_model.tie_weights).parameters


# methods of transformers 4.15's PreTrainedModel that the original's med.py relies on, with the test of
# whether the installed PreTrainedModel lacks them; they go on med.BertPreTrainedModel (the original's class)
METHOD_SHIMS = [
    # PreTrainedModel.invert_attention_mask (removed in transformers 5)
    ("invert_attention_mask", invert_attention_mask, lambda cls: not hasattr(cls, "invert_attention_mask")),
    # PreTrainedModel.get_head_mask (removed in transformers 5)
    ("get_head_mask", get_head_mask, lambda cls: not hasattr(cls, "get_head_mask")),
    # PreTrainedModel.init_weights (transformers 5's fails before post_init and ties nothing undeclared)
    ("init_weights", init_weights, _tying_by_mapping),
    # PreTrainedModel.tie_weights (transformers 5's leaves the decoder's LM head untied from its word embeddings)
    ("tie_weights", tie_weights, _tying_by_mapping),
]


def _import_or_none(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _lacking() -> list[tuple[str, str]]:
    """The (module, name) pairs of :data:`SHIMS` that the installed libraries do not provide."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm 1.x warns on its deprecated timm.models.layers / helpers
        return [(module, name) for module, name, _ in SHIMS
                if not hasattr(_import_or_none(module) or object(), name)]


@contextlib.contextmanager
def _shims_installed():
    """Supply the lacking names (new modules in ``sys.modules`` or new attributes on existing ones) for the
    duration of the block, then take them away again: nothing outside sees a fake ``timm``."""
    added_modules, added_attributes = [], []
    suppliers = {(module, name): supply for module, name, supply in SHIMS}
    try:
        for module_name, name in _lacking():
            module = _import_or_none(module_name)
            if module is None:
                parts = module_name.split(".")
                for depth in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:depth])
                    if prefix in sys.modules or _import_or_none(prefix) is not None:
                        continue
                    sys.modules[prefix] = types.ModuleType(prefix, "original_blip shim")
                    added_modules.append(prefix)
                    if depth > 1:  # the new module as an attribute of its parent package
                        parent = sys.modules[".".join(parts[:depth - 1])]
                        setattr(parent, parts[depth - 1], sys.modules[prefix])
                        added_attributes.append((parent, parts[depth - 1]))
                module = sys.modules[module_name]
            setattr(module, name, suppliers[module_name, name]())
            added_attributes.append((module, name))
        yield
    finally:
        for module, name in added_attributes:
            if name in vars(module):
                delattr(module, name)
        for prefix in reversed(added_modules):
            sys.modules.pop(prefix, None)


@contextlib.contextmanager
def _patched(obj, name, value):
    """``obj.name = value`` inside the block; the attribute is restored (or removed) afterwards."""
    had, old = name in vars(obj), vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


# ---------------------------------------------------------------- the original package, loaded


# the original's modules with a model: pretraining, captioning (blip.BLIP_Decoder), retrieval, VQA, NLVR2
MODULES = ("blip_pretrain", "blip", "blip_retrieval", "blip_vqa", "blip_nlvr")
# its text transformers, each with its own BertPreTrainedModel: med.py, and NLVR2's two-image encoder
ENCODER_MODULES = ("blip.models.med", "blip.models.nlvr_encoder")


@functools.cache
def load_original_module(name: str) -> types.ModuleType:
    """``blip.models.<name>`` (one of :data:`MODULES`) of the installed ``blip-ci``, imported under :data:`SHIMS`."""
    if name not in MODULES:
        raise ValueError(f"the original has no model module {name!r}; choose one of {', '.join(MODULES)}")
    if not is_available():
        raise OriginalUnavailable(f"the original BLIP code is not installed: {INSTALL_HINT}")
    # blip/models/blip.py runs warnings.filterwarnings("ignore") and blip_pretrain.py silences transformers'
    # logging at import: both process-wide settings are put back afterwards
    with warnings.catch_warnings(), _quiet_transformers(), _shims_installed():
        module = importlib.import_module(f"blip.models.{name}")
    for encoder in (sys.modules[e] for e in ENCODER_MODULES if e in sys.modules):
        for method_name, method, lacking in METHOD_SHIMS:
            if lacking(encoder.PreTrainedModel):
                setattr(encoder.BertPreTrainedModel, method_name, method)
    # pretraining and retrieval gather their queue entries (once, even if loaded twice)
    if hasattr(module, "concat_all_gather") and not getattr(module.concat_all_gather, "one_process", False):
        module.concat_all_gather = _concat_all_gather(module.concat_all_gather)
    return module


def load_original() -> types.ModuleType:
    """``blip.models.blip_pretrain`` of the installed ``blip-ci``, imported under :data:`SHIMS`."""
    return load_original_module("blip_pretrain")


def _concat_all_gather(original):
    @torch.no_grad()
    def concat_all_gather_one_process(tensor):
        """The original ``concat_all_gather``; without a process group, what it does in a group of one."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return original(tensor)
        tensors_gather = [torch.ones_like(tensor)]
        tensors_gather[0].copy_(tensor)  # all_gather into the one-element list
        return torch.cat(tensors_gather, dim=0)

    concat_all_gather_one_process.one_process = True
    return concat_all_gather_one_process


def offline_tokenizer(vocab_file: str | Path = VOCAB_FILE):
    """The original ``init_tokenizer`` without a download: transformers' ``BertTokenizer`` on the BERT-base
    uncased vocabulary shipped with blip_fast, plus [DEC] as bos token and [ENC] as additional special token."""
    from transformers import BertTokenizer

    if "vocab_file" in inspect.signature(BertTokenizer.__init__).parameters:  # transformers 4
        tokenizer = BertTokenizer(vocab_file=str(vocab_file))
    else:  # transformers 5: vocab= takes the token -> id mapping (a vocab_file= keyword is silently ignored)
        from transformers.models.bert.tokenization_bert import load_vocab

        tokenizer = BertTokenizer(vocab=load_vocab(str(vocab_file)))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    # the original reads tokenizer.additional_special_tokens_ids[0], which transformers 5 no longer has
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


@contextlib.contextmanager
def _quiet_transformers():
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _vit_name(config: BlipConfig) -> str:
    vision = config.vision
    shape = (vision.width, vision.depth, vision.num_heads, vision.patch_size, vision.mlp_ratio)
    for name, known in (("base", (768, 12, 12, 16, 4.0)), ("large", (1024, 24, 16, 16, 4.0))):
        if shape == known:
            return name
    raise ValueError("the original BLIP has ViT-B/16 and ViT-L/16 only (presets base and large); got width "
                     f"{vision.width}, depth {vision.depth}, heads {vision.num_heads}, patch {vision.patch_size}")


def med_config_dict(config: BlipConfig, encoder_width: int | None = None) -> dict:
    """The original's ``configs/bert_config.json`` for ``config.text`` (its vocabulary already 30,524: the
    original resizes BERT's 30,522 to the tokenizer's length, here a no-op). ``encoder_width`` (default: the
    ViT's) is the width of what cross-attention reads where a constructor takes it from the file."""
    text = config.text
    return {"architectures": ["BertModel"], "attention_probs_dropout_prob": text.attention_dropout,
            "hidden_act": "gelu", "hidden_dropout_prob": text.hidden_dropout, "hidden_size": text.hidden_size,
            "initializer_range": text.initializer_range, "intermediate_size": text.intermediate_size,
            "layer_norm_eps": text.layer_norm_eps, "max_position_embeddings": text.max_position_embeddings,
            "model_type": "bert", "num_attention_heads": text.num_heads, "num_hidden_layers": text.num_layers,
            "pad_token_id": text.pad_token_id, "type_vocab_size": 2, "vocab_size": text.vocab_size,
            "encoder_width": encoder_width or config.vision.width, "add_cross_attention": True}


def _check_drop_path(config: BlipConfig, vit: str, asked: float) -> None:
    """``create_vit(vit, ..., drop_path_rate=asked)`` builds ViT-B with ``0 or asked`` and ViT-L with
    ``0.1 or asked``, i.e. always 0.1: ``config`` must say the same."""
    rate = 0.1 if vit == "large" else asked
    if config.vision.drop_path_rate != rate:
        raise ValueError(f"this original model's ViT-{vit[0].upper()} has drop-path {rate}; the config says "
                         f"{config.vision.drop_path_rate}")


@contextlib.contextmanager
def _offline(config: BlipConfig, module: types.ModuleType, encoder_width: int | None = None):
    """Inside the block, the original constructors in ``module`` build ``config``'s shapes with no download;
    yields the path of the med_config JSON to pass them."""
    med = importlib.import_module("blip.models.med")

    def from_config(cls, name, *args, config, **kwargs):  # BertModel.from_pretrained('bert-base-uncased', ...)
        return cls(config, *args, **kwargs)

    def no_deit_download(url, *args, **kwargs):  # torch.hub.load_state_dict_from_url(DeiT-B weights)
        return {"model": {}}

    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        med_config = Path(folder) / "med_config.json"
        med_config.write_text(json.dumps(med_config_dict(config, encoder_width)))
        stack.enter_context(_shims_installed())  # BLIP_Pretrain's ViT-L imports from timm.models.helpers
        # each module imported init_tokenizer from blip.models.blip into its own namespace
        stack.enter_context(_patched(module, "init_tokenizer", offline_tokenizer))
        stack.enter_context(_patched(torch.hub, "load_state_dict_from_url", no_deit_download))
        for cls in (med.BertModel, med.BertLMHeadModel):
            stack.enter_context(_patched(cls, "from_pretrained", classmethod(from_config)))
        if _vit_name(config) == "large":
            helpers = importlib.import_module("timm.models.helpers")
            stack.enter_context(_patched(helpers, "load_custom_pretrained", load_custom_pretrained))
            stack.enter_context(_patched(importlib.import_module("timm.models.vision_transformer"), "default_cfgs",
                                         {"vit_large_patch16_224_in21k": {}}))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))  # tie_encoder_decoder_weights prints a line
        stack.enter_context(warnings.catch_warnings())                  # per tied module
        warnings.simplefilter("ignore")
        stack.enter_context(_quiet_transformers())  # as the original's import left it (set_verbosity_error)
        yield str(med_config)


def build_original_pretrain(config: BlipConfig) -> nn.Module:
    """The original ``BLIP_Pretrain`` for ``config`` (ViT base or large; any text shape), on the CPU, random
    weights, no network."""
    blip_pretrain = load_original()
    vit = _vit_name(config)
    _check_drop_path(config, vit, 0.0)
    with _offline(config, blip_pretrain) as med_config:
        model = blip_pretrain.BLIP_Pretrain(med_config=med_config, image_size=config.vision.image_size, vit=vit,
                                            embed_dim=config.embed_dim, queue_size=config.queue_size,
                                            momentum=config.momentum)
    with torch.no_grad():
        model.temp.fill_(config.temp)
    return model


def build_original_retrieval(config: BlipConfig) -> nn.Module:
    """The original ``blip_retrieval.BLIP_Retrieval`` for ``config`` (as :func:`build_original_pretrain`)."""
    blip_retrieval = load_original_module("blip_retrieval")
    vit = _vit_name(config)
    _check_drop_path(config, vit, 0.0)
    with _offline(config, blip_retrieval) as med_config:
        model = blip_retrieval.BLIP_Retrieval(med_config=med_config, image_size=config.vision.image_size, vit=vit,
                                              embed_dim=config.embed_dim, queue_size=config.queue_size,
                                              momentum=config.momentum, negative_all_rank=config.negative_all_rank)
    with torch.no_grad():
        model.temp.fill_(config.temp)
    return model


def build_original_caption(config: BlipConfig) -> nn.Module:
    """The original captioner ``blip.BLIP_Decoder`` for ``config`` (its prompt ``config.prompt``)."""
    blip = load_original_module("blip")
    vit = _vit_name(config)
    _check_drop_path(config, vit, 0.0)
    with _offline(config, blip) as med_config:
        return blip.BLIP_Decoder(med_config=med_config, image_size=config.vision.image_size, vit=vit,
                                 prompt=config.prompt)


def build_original_vqa(config: BlipConfig) -> nn.Module:
    """The original ``blip_vqa.BLIP_VQA`` for ``config``.

    Its ViT has drop-path 0.1. Its answer decoder takes ``encoder_width`` from the med_config file as it is,
    while the question encoder's is set to the ViT's: the file says the text width, which is what the decoder
    attends to (the question's states; in the original's file 768 serves both, as BERT-base and ViT-B are
    both 768 wide)."""
    blip_vqa = load_original_module("blip_vqa")
    vit = _vit_name(config)
    _check_drop_path(config, vit, 0.1)
    with _offline(config, blip_vqa, encoder_width=config.text.hidden_size) as med_config:
        return blip_vqa.BLIP_VQA(med_config=med_config, image_size=config.vision.image_size, vit=vit)


def build_original_nlvr(config: BlipConfig) -> nn.Module:
    """The original ``blip_nlvr.BLIP_NLVR`` for ``config``: its ViT has drop-path 0.1; its text encoder
    (``nlvr_encoder.BertModel``) cross-attends to two images, merging them with a learned layer from layer 6 on."""
    blip_nlvr = load_original_module("blip_nlvr")
    vit = _vit_name(config)
    _check_drop_path(config, vit, 0.1)
    with _offline(config, blip_nlvr) as med_config:
        return blip_nlvr.BLIP_NLVR(med_config=med_config, image_size=config.vision.image_size, vit=vit)


# ---------------------------------------------------------------- the original's own initialisation, from files


def from_pretrained_4_15(folder: str | Path):
    """A ``from_pretrained`` for the original's ``BertModel`` and ``BertLMHeadModel`` that reads the BERT of ``folder``
    whatever name it is given (``'bert-base-uncased'``), as transformers 4.15's did; set it on the class as a
    classmethod.

    transformers 5's own cannot build the original's classes (they never call ``post_init``), and it loads
    differently. 4.15's, the one the original was written for, builds ``cls(config, ...)`` around the very config
    object it is given (pretraining builds its momentum text encoder from that object after
    ``resize_token_embeddings`` grew its vocabulary; 5 copies it); renames ``gamma``/``beta`` in the keys of older
    files to ``weight``/``bias``; loads from under ``bert.`` into a model without that prefix (``BertModel``), or a
    file without it into the model's ``bert`` (a ``BertModel`` file into ``BertLMHeadModel``); loads what the model
    has, the rest keeping its init (a shape mismatch fails); ties the LM head to the word embeddings again and
    returns the model in eval mode. 4.15 read ``pytorch_model.bin`` only; ``model.safetensors`` is read first, as
    later 4.x did, with the same keys.
    """
    folder = Path(folder)

    def from_pretrained(cls, name, *args, config, **kwargs):
        model = cls(config, *args, **kwargs)
        if (folder / "model.safetensors").is_file():
            from safetensors.torch import load_file

            state = load_file(folder / "model.safetensors")
        else:
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        renamed = {}
        for key, value in state.items():
            new_key = key
            if "gamma" in key:
                new_key = key.replace("gamma", "weight")
            if "beta" in key:
                new_key = key.replace("beta", "bias")
            renamed[new_key] = value
        prefix = cls.base_model_prefix
        has_prefix_module = any(key.startswith(prefix) for key in renamed)
        start_prefix, model_to_load = "", model
        if not hasattr(model, prefix) and has_prefix_module:
            start_prefix = prefix + "."
        if hasattr(model, prefix) and not has_prefix_module:
            model_to_load = getattr(model, prefix)
        model_to_load.load_state_dict({key[len(start_prefix):]: value for key, value in renamed.items()
                                       if key.startswith(start_prefix)}, strict=False)
        model.tie_weights()
        return model.eval()

    return from_pretrained


def build_original_pretrain_from_files(config: BlipConfig, vit_file: str | Path, bert_folder: str | Path) -> nn.Module:
    """The original ``BLIP_Pretrain`` initialised as its ``__init__`` initialises pretraining, from local files in
    place of its downloads.

    The ViT: a torch file goes through the ViT-B branch, as ``torch.hub.load_state_dict_from_url`` returns DeiT-B
    (``{'model': state_dict}``, loaded with ``strict=False``); a JAX ``.npz`` through the ViT-L branch, timm's
    ``load_custom_pretrained``, which downloads the file its config names and hands it to the ViT's
    ``load_pretrained`` (the original's ``_load_weights``). The ViT is the original's ``VisionTransformer`` at
    ``config.vision``'s shape: ``create_vit`` builds ViT-B/16 and ViT-L/16 only, and neither branch depends on the
    shape, so tests can stay small. The text encoder and decoder: ``bert_folder`` read by
    :func:`from_pretrained_4_15`, with the original's ``bert_config.json`` written for ``config.text`` and the folder's
    vocabulary (BERT's 30,522, which ``resize_token_embeddings`` grows to the tokenizer's 30,524). The tokenizer is
    :func:`offline_tokenizer`. Nothing is downloaded.
    """
    blip_pretrain = load_original()
    vit_module = sys.modules["blip.models.vit"]
    med = importlib.import_module("blip.models.med")
    vision, vit_file, jax = config.vision, Path(vit_file), Path(vit_file).suffix == ".npz"

    def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        return vit_module.VisionTransformer(
            img_size=image_size, patch_size=vision.patch_size, embed_dim=vision.width, depth=vision.depth,
            num_heads=vision.num_heads, mlp_ratio=vision.mlp_ratio, drop_path_rate=vision.drop_path_rate), vision.width

    def load_state_dict_from_url(url, *args, **kwargs):  # DeiT-B's download
        return torch.load(vit_file, map_location="cpu", weights_only=True)

    def load_custom_pretrained(model, default_cfg=None, load_fn=None, progress=False, check_hash=False):
        model.load_pretrained(default_cfg["url"])  # timm's, the download being the file itself

    bert_vocab = json.loads((Path(bert_folder) / "config.json").read_text())["vocab_size"]
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        med_config = Path(folder) / "bert_config.json"
        med_config.write_text(json.dumps({**med_config_dict(config), "vocab_size": bert_vocab}))
        stack.enter_context(_shims_installed())
        stack.enter_context(_patched(blip_pretrain, "init_tokenizer", offline_tokenizer))
        stack.enter_context(_patched(blip_pretrain, "create_vit", create_vit))
        stack.enter_context(_patched(torch.hub, "load_state_dict_from_url", load_state_dict_from_url))
        for cls in (med.BertModel, med.BertLMHeadModel):
            stack.enter_context(_patched(cls, "from_pretrained", classmethod(from_pretrained_4_15(bert_folder))))
        if jax:
            helpers = importlib.import_module("timm.models.helpers")
            stack.enter_context(_patched(helpers, "load_custom_pretrained", load_custom_pretrained))
            stack.enter_context(_patched(importlib.import_module("timm.models.vision_transformer"), "default_cfgs",
                                         {"vit_large_patch16_224_in21k": {"url": str(vit_file)}}))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))  # tie_encoder_decoder_weights prints a line
        stack.enter_context(warnings.catch_warnings())                  # per tied module
        warnings.simplefilter("ignore")
        stack.enter_context(_quiet_transformers())
        return blip_pretrain.BLIP_Pretrain(med_config=str(med_config), image_size=vision.image_size,
                                           vit="large" if jax else "base", embed_dim=config.embed_dim,
                                           queue_size=config.queue_size, momentum=config.momentum)
