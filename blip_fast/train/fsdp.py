"""FSDP2 for BLIP pretraining (``train.distributed: fsdp``): weights, gradients and AdamW state sharded over ranks.

``torch.distributed.fsdp.fully_shard`` turns every parameter of a module into a DTensor sharded
along dim 0 (rank r holds rows r/W of it); each group of modules given to one ``fully_shard`` call
is all-gathered before its forward and freed after, and its gradients are reduce-scattered after
its backward. Each rank computes on its own batch, as with DDP, and AdamW steps on its shards.

Layout (torchtitan's ``apply_fsdp``: one group per transformer block, the rest in the root group):

* each ViT block of the online and of the momentum image encoder is its own group: used once per
  step, so it is gathered for its forward (and again for its backward) and freed in between;
* each layer of the momentum text encoder is its own group: used once, without gradients;
* everything else is the root group, gathered once when the step's forward begins and kept until
  its backward ends, when its gradients are reduced once. That holds the online text transformer
  on purpose: the encoder runs twice per step (ITC, then ITM on 3B rows) and the decoder shares its
  embeddings, cross-attention and feed-forward modules (``share_all_but_self_attention``), and
  the cross-attention key/value projections are also called outside any layer's forward
  (``context_keys_values``). A group per text layer would be gathered four times a step, reduce
  its gradients after each use, and not be gathered at all for those direct calls;
* the ITC temperature is left out (``ignored_params``): FSDP2 cannot shard a 0-d parameter. It
  stays a plain tensor, equal on all ranks; :func:`average_replicated_gradients` averages its gradient.

Momentum encoders. The forward of BlipPretrain updates them in place (``p_m <- m p_m + (1 - m) p``)
and clamps the temperature. Inside an FSDP forward those writes would go to the transient
unsharded copies and be lost when they are freed, so the model is told not to
(``updates_in_forward = False``) and :func:`update_before_forward` does both on the shards before
each forward -- the same arithmetic, since neither depends on what the forward computes. A
parameter and its momentum twin have the same shape and are both sharded ``Shard(0)`` on the same
mesh, whatever their groups, so rank r holds the same rows of both and the update of the local
shards is exactly the update of the full tensors.

Precision. With ``train.precision: bf16`` every group gets FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)``: the all-gathers move bf16 weights (half the traffic of fp32) and the forward and backward
compute with them, the gradients are reduce-scattered in fp32, and the shards AdamW steps on stay fp32 (as do the
momentum update's). Autocast stays on around the forward, as with DDP; it still runs LayerNorm and the losses in
fp32. Against DDP's bf16 the difference is that the LayerNorm, embedding and bias weights are rounded to bf16 too
(tests/train/test_fsdp.py: losses within 2e-2 over three steps).

Buffers (the feature queues and their pointer) are not sharded: every rank keeps a full copy and
writes the same all-gathered features into it (``BlipPretrain.enqueue``). Initial weights and queues
are broadcast from rank 0 before sharding, as DDP does.

Checkpoints hold the same full, unsharded ``model.state_dict()`` and ``optimizer.state_dict()``
(tensors indexed by position) as a single process or DDP writes: torch.distributed.checkpoint's
``get_*_state_dict(full_state_dict=True, cpu_offload=True)`` gathers them on rank 0, keyed by
parameter name, and :func:`full_state_dicts` renumbers them; :func:`load_full_state_dicts` does the
reverse (every rank reads the file and keeps its rows). So a run may change between single
process, DDP and FSDP at a checkpoint (the data position still needs the same number of ranks).

AdamW runs on the DTensor shards: torch's fused and ``foreach`` AdamW both accept them (checked on
CPU with gloo, torch 2.13). apex's FusedAdam does not (its kernels read tensor storage, which a
DTensor wrapper does not have), so ``optim.fused: auto`` means torch's fused AdamW here and
``apex`` is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..checkpoint.io import CheckpointError
from ..config import ConfigError
from ..models.blip_pretrain import BlipPretrain
from ..ops.momentum import momentum_update_op
from .config import OptimConfig
from .optim import build_optimizer

log = logging.getLogger("blip_fast.train")

# rank 0 receives the gathered tensors, on the CPU; the other ranks take part in the gathers and get {}
FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """bf16: weights gathered and computed in bf16, gradients reduced in fp32 (see the module docstring)."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: BlipPretrain, device: torch.device, precision: str = "fp32") -> None:
    """Shard ``model`` in place over all ranks of the default process group (see the module docstring)."""
    broadcast_from_rank0(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision_policy(precision)
    units = [*model.visual_encoder.blocks, *model.visual_encoder_m.blocks, *model.text_encoder_m.encoder.layer]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, ignored_params={model.temp}, mp_policy=policy)
    model.updates_in_forward = False
    log.info("FSDP2: %d blocks sharded on their own, the rest in the root group, over %d ranks",
             len(units), mesh.size())


@torch.no_grad()
def broadcast_from_rank0(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (each rank initialised its own from its own seed)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.detach(), src=0)


def build_sharded_optimizer(model: BlipPretrain, config: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the sharded parameters: ``build_optimizer`` without apex (see the module docstring)."""
    if config.fused == "apex":
        raise ConfigError("optim.fused=apex cannot step FSDP's sharded (DTensor) parameters; use torch, auto or "
                          "foreach with train.distributed=fsdp")
    if config.fused == "auto":
        config = dataclasses.replace(config, fused="torch")
    return build_optimizer(model, config, device)


@torch.no_grad()
def update_before_forward(model: BlipPretrain) -> None:
    """The forward's in-place updates -- temperature clamp, momentum update -- on the sharded parameters
    (between steps and micro-batches every group is resharded: FSDP reshards after each backward)."""
    model.clamp_temperature_()
    online, momentum = [], []
    for encoder, encoder_m in model.momentum_pairs():
        online += list(encoder.parameters())
        momentum += list(encoder_m.parameters())
    # the torch backend whatever train.impl says: the reference assigns ``param.data``, which on a DTensor
    # replaces the wrapper's tensor but not the shard storage FSDP gathers from, so the update would be lost
    momentum_update_op.function("torch")(momentum, online, model.config.momentum)


def average_replicated_gradients(model: BlipPretrain) -> None:
    """Average the temperature's gradient over ranks (FSDP reduces only the parameters it shards)."""
    grad = model.temp.grad
    if grad is not None:
        dist.all_reduce(grad)  # a sum: gloo has no average
        grad.div_(dist.get_world_size())


@contextlib.contextmanager
def no_gradient_sync(model: FSDPModule):
    """Keep this micro-batch's gradients unsharded and unreduced (FSDP's ``no_sync``: forward and backward inside)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_model_state_dict(model: FSDPModule) -> dict:
    """``model.state_dict()`` unsharded, on rank 0 (CPU); ``{}`` elsewhere. Every rank must call it.

    On a CPU run the tensors FSDP does not shard (temperature, queues) are the model's own, not copies.
    """
    return get_model_state_dict(model, options=FULL_ON_RANK0)


def full_state_dicts(model: FSDPModule, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model's and the optimizer's state as a single process's ``state_dict()`` gives them, on rank 0
    (CPU); ``{}`` elsewhere. Every rank must call it."""
    by_name = get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0)
    return full_model_state_dict(model), _optimizer_state_by_index(by_name) if by_name else {}


def load_full_state_dicts(model: FSDPModule, optimizer: torch.optim.Optimizer, model_state: dict,
                          optimizer_state: dict) -> None:
    """Load full states (a single process's, DDP's or :func:`full_state_dicts`') into the shards; every rank
    passes the same full dicts and keeps its own rows."""
    _load_full_model_state(model, model_state)
    set_optimizer_state_dict(model, optimizer, _optimizer_state_by_name(optimizer_state, model, optimizer),
                             options=StateDictOptions(full_state_dict=True))


@torch.no_grad()
def _load_full_model_state(model: FSDPModule, state: dict) -> None:
    # not set_model_state_dict: it shards the tensors of each module once, but load_state_dict visits the
    # modules the decoder shares with the encoder under both names, and the second copy stays unsharded
    current = model.state_dict()
    sharded = {}
    for name, value in state.items():
        target = current.get(name)
        if isinstance(target, DTensor):  # every rank holds the full tensor: each keeps its rows, no communication
            value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements,
                                      src_data_rank=None)
        sharded[name] = value
    model.load_state_dict(sharded)


def _optimizer_state_by_index(state: dict) -> dict:
    """torch.distributed.checkpoint's optimizer state (keyed by parameter name) as ``Optimizer.state_dict()``
    numbers it: parameters counted in group order."""
    names = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: position for position, name in enumerate(names)}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [group | {"params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def _optimizer_state_by_name(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of :func:`_optimizer_state_by_index` for this optimizer's parameters."""
    sizes = [len(group["params"]) for group in state["param_groups"]]
    expected = [len(group["params"]) for group in optimizer.param_groups]
    if sizes != expected:
        raise CheckpointError(f"the checkpoint's optimizer has parameter groups of {sizes} tensors, this run's "
                              f"{expected}: resume with the optim settings it was written with")
    # named_parameters() names a shared parameter once, by its first name, as torch.distributed.checkpoint does
    name_of = {param: name for name, param in model.named_parameters()}
    names = [name_of[param] for group in optimizer.param_groups for param in group["params"]]
    return {"state": {names[position]: value for position, value in state["state"].items()},
            "param_groups": [group | {"params": [names[position] for position in group["params"]]}
                             for group in state["param_groups"]]}


def unsharded_copy(model: BlipPretrain) -> BlipPretrain | None:
    """A plain BlipPretrain with the full weights on rank 0 (for evaluation), None elsewhere. Every rank must
    call it."""
    state = full_model_state_dict(model)
    if dist.get_rank() != 0:
        return None
    device = model.temp.device
    # building the copy draws initial weights: leave the training RNG where it was
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        copy = BlipPretrain(model.config).to(device)
    copy.load_state_dict(state)
    return copy
