"""A trained BLIP checkpoint's weights into a model of another task, as the original's fine-tuning scripts load them.

Every downstream task of the original starts from a pretrained checkpoint through a ``load_checkpoint`` that keeps
what fits and leaves the rest fresh (``models/blip.py``; ``models/blip_nlvr.py`` for NLVR2):

* position embeddings resampled to the task's image size (224 -> 384 px), the momentum encoder's too;
* every weight whose name and shape the task model has is loaded, others are left: a retrieval model takes the
  pretrained encoders, their momentum twins and the feature queues (its image-id queue starts empty); a captioner
  the ViT and the decoder; VQA's question encoder and answer decoder come from the pretrained encoder and decoder
  (the decoder's cross-attention reads the question's states, of the text width: for ViT-L, whose tokens are wider,
  it starts fresh);
* NLVR2's two cross-attention branches both start as the one pretrained cross-attention (``self`` -> ``self0`` and
  ``self1``, ``output.dense`` -> ``dense0`` and ``dense1``); its merge layers and classifier start fresh.

Unlike the original, a checkpoint of another architecture (another ViT, another text width or depth) is an error
before anything loads, not a model whose weights silently stayed random; and momentum twins the checkpoint lacks
start as copies of the loaded online weights, not of the random ones. What was left fresh or unused is reported
in one line each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import BlipConfig
from .init import abbreviate
from .io import CheckpointError
from .state import resize_position_embeddings, with_momentum_twins

# the sizes two models must share for one's weights to mean anything in the other
ARCHITECTURE = {"vision": ("patch_size", "width", "depth", "num_heads", "mlp_ratio"),
                "text": ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")}


@dataclass
class TransferReport:
    source: str
    source_task: str
    task: str
    loaded: int = 0
    """Tensors of the model that came from the checkpoint."""
    fresh: list[str] = field(default_factory=list)
    """The model's tensors the checkpoint does not hold (or holds in another shape): left as initialised."""
    unused: list[str] = field(default_factory=list)
    """The checkpoint's tensors the model has no place for."""
    resized: list[str] = field(default_factory=list)
    """Position embeddings resampled to the model's image size."""

    def lines(self) -> list[str]:
        lines = [f"initialised the {self.task} model from the {self.source_task} checkpoint {self.source}: "
                 f"{self.loaded} tensors loaded"
                 + (f", {', '.join(self.resized)} resampled to the image size" if self.resized else "")]
        lines.append(f"left fresh ({len(self.fresh)}): {abbreviate(self.fresh)}")
        lines.append(f"unused from the checkpoint ({len(self.unused)}): {abbreviate(self.unused)}")
        return lines


def check_same_architecture(model_config: BlipConfig, source_config: BlipConfig, source: str) -> None:
    different = [f"{part}.{name} {getattr(getattr(source_config, part), name)} (this model: "
                 f"{getattr(getattr(model_config, part), name)})"
                 for part, names in ARCHITECTURE.items() for name in names
                 if getattr(getattr(source_config, part), name) != getattr(getattr(model_config, part), name)]
    if model_config.embed_dim != source_config.embed_dim:
        different.append(f"embed_dim {source_config.embed_dim} (this model: {model_config.embed_dim})")
    if different:
        raise CheckpointError(f"{source} is another architecture than the model to initialise: it has "
                              f"{'; '.join(different)}. Choose the matching preset (e.g. preset=large) or model "
                              "sizes")


def twin_cross_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NLVR2's two branches from one cross-attention: ``crossattention.self.*`` to ``self0``/``self1`` and
    ``crossattention.output.dense.*`` to ``dense0``/``dense1`` (the original ``blip_nlvr.load_checkpoint``)."""
    twinned = dict(state)
    for key, value in state.items():
        for single, pair in ((".crossattention.self.", ("self0", "self1")),
                             (".crossattention.output.dense.", ("dense0", "dense1"))):
            if single in key:
                name = single.strip(".").split(".")[-1]  # "self" or "dense"
                for twin in pair:
                    twinned[key.replace(single, single.replace(f".{name}.", f".{twin}."))] = value
    return twinned


@torch.no_grad()
def transfer_state(model: nn.Module, state: dict[str, torch.Tensor], source_task: str, source_config: BlipConfig,
                   source: str) -> TransferReport:
    """Load what of ``state`` (a ``source_task`` model's, original key names) fits ``model``, as the original's
    fine-tuning does (see the module docstring)."""
    check_same_architecture(model.config, source_config, source)
    state = dict(state)
    report = TransferReport(source, source_task, model.task)
    vision = model.config.vision
    if source_config.vision.image_size != vision.image_size:
        resize_position_embeddings(state, vision.image_size, vision.patch_size)
        report.resized = [k for k in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed") if k in state]
    if model.task == "nlvr" and source_task != "nlvr":
        state = twin_cross_attention(state)
    expected = model.state_dict()
    usable = {k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape}
    # momentum twins the checkpoint lacks follow the online weights they shadow (the original would keep copies of
    # the random initialisation: a captioner's checkpoint has no momentum encoders)
    usable = with_momentum_twins(usable, expected)
    model.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    report.fresh = [k for k in expected if k not in usable]
    report.unused = [k for k in state if k not in expected or state[k].shape != expected[k].shape]
    return report


def init_from_checkpoint(model: nn.Module, path: str | Path) -> TransferReport:
    """Initialise ``model`` from any BLIP checkpoint (Salesforce ``.pth``, ours, a Hugging Face directory) of any
    task, as :func:`transfer_state`."""
    from . import load_checkpoint  # the loaders of every format; they import this package's modules

    source = load_checkpoint(path)
    return transfer_state(model, source.state_dict(), source.task, source.config, str(path))
