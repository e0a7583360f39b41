"""Two gloo processes take one FSDP2 training step; a single process reproduces it; the checkpoint is a single
process's.

As for DDP (test_distributed.py), the math says: each rank's losses are one process's forward on its
half of the batch; AdamW steps on the average of the two halves' gradients (here also clipped, to
check the global norm over sharded gradients); the momentum weights take one EMA step; the queues
receive rank 0's momentum features, then rank 1's. FSDP adds: the gradients AdamW sees are checked
themselves (Adam's first step hardly depends on their scale); the temperature, which FSDP cannot
shard, sits in the same AdamW group as the sharded weights (``optim.temp_lr=null``) and must stay
equal on both ranks, as must the queues. One intra-op thread everywhere: the tolerance (1e-6
relative, as for DDP) absorbs the reductions' summation order.

The checkpoint of the two FSDP ranks must load into a plain BlipPretrain and its AdamW, equal the
single process's state after the same step, and load back into a new FSDP run unchanged.
"""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from train_helpers import BATCH, WORLD, assert_rel_close, free_port, rank_batches, tiny_overrides

from blip_fast.models.blip_pretrain import BlipPretrain
from blip_fast.train.checkpointing import latest_checkpoint, load_training_checkpoint
from blip_fast.train.config import load_pretrain_config
from blip_fast.train.optim import build_optimizer, set_learning_rate
from blip_fast.train.schedule import learning_rate

CLIP = 0.5
REPLICATED = ("temp", "image_queue", "text_queue", "queue_ptr")




def _overrides(synthetic_dir, out):
    return tiny_overrides(synthetic_dir, out, "optim.warmup_steps=0", "train.device=cpu", "train.distributed=fsdp",
                          "optim.temp_lr=null", f"optim.clip_grad_norm={CLIP}")


def _replicated(model) -> dict:
    return {name: getattr(model, name).detach().clone() for name in REPLICATED}


def _full_gradients(model) -> dict:
    from torch.distributed.tensor import DTensor

    return {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for name, p in model.named_parameters() if p.grad is not None}


def _rank_main(rank, port, synthetic_dir, out, batches):
    from blip_fast.train import fsdp
    from blip_fast.train.pretraining import Pretrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    config = load_pretrain_config(None, _overrides(synthetic_dir, out))
    trainer = Pretrainer(config, printer=lambda *_: None)
    try:
        # cloned: the gathered dict holds the unsharded tensors (temperature, queues) themselves
        initial = {k: v.clone() for k, v in fsdp.full_model_state_dict(trainer.model).items()}
        initial_replicated = _replicated(trainer.model)
        generator = trainer.generator.get_state()
        seen = {}  # what AdamW steps on: reduced and clipped
        trainer.optimizer.register_step_pre_hook(lambda *_: seen.update(_full_gradients(trainer.model)))
        losses = trainer.train_step([SimpleNamespace(**batches[rank])])
        trainer.save()
        resumed = Pretrainer(config, resume=True, printer=lambda *_: None)
        resumed_model, resumed_optimizer = fsdp.full_state_dicts(resumed.model, resumed.optimizer)
        torch.save({"initial": initial, "initial_replicated": initial_replicated, "generator": generator,
                    "losses": losses, "gradients": seen, "replicated": _replicated(trainer.model),
                    "resumed_model": resumed_model, "resumed_optimizer": resumed_optimizer}, out / f"rank{rank}.pt")
    finally:
        trainer.close()






@pytest.fixture(scope="module")
def fsdp_run(synthetic_dir, tmp_path_factory):
    """The two ranks' step, checkpoint and resume, and the single process's replay of the step."""
    out = tmp_path_factory.mktemp("fsdp")
    batches = rank_batches(synthetic_dir)
    mp.spawn(_rank_main, args=(free_port(), synthetic_dir, out, batches), nprocs=WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    torch.set_num_threads(1)
    config = load_pretrain_config(None, _overrides(synthetic_dir, out))
    halves, losses = [], []
    for rank in range(WORLD):
        model = BlipPretrain(config.model_config())
        model.load_state_dict(ranks[0]["initial"])
        generator = torch.Generator().set_state(ranks[rank]["generator"])
        b = batches[rank]
        output = model(b["images"], b["input_ids"], b["attention_mask"], alpha=0.0, generator=generator,
                       packing=b["packing"])
        stacked = torch.stack([output[k] for k in ("itc", "itm", "lm")])
        stacked.sum().backward()
        halves.append(model)
        losses.append(stacked.detach())

    stepped = BlipPretrain(config.model_config())
    stepped.load_state_dict(ranks[0]["initial"])
    optimizer = build_optimizer(stepped, config.optim, torch.device("cpu"))
    set_learning_rate(optimizer, learning_rate(config.optim, 0, 0, config.train.epochs))
    for param, *replicas in zip(stepped.parameters(), *(m.parameters() for m in halves), strict=True):
        if param.requires_grad:
            param.grad = sum(r.grad for r in replicas) / WORLD
    norm = torch.nn.utils.clip_grad_norm_(stepped.parameters(), CLIP)
    assert norm > CLIP  # so the clipping is exercised
    gradients = {name: p.grad.clone() for name, p in stepped.named_parameters() if p.grad is not None}
    optimizer.step()
    return SimpleNamespace(out=out, config=config, ranks=ranks, halves=halves, losses=losses, gradients=gradients,
                           stepped=stepped, optimizer=optimizer,
                           checkpoint=load_training_checkpoint(latest_checkpoint(out)))


def test_fsdp_step_equals_single_process_on_the_same_batches(fsdp_run):
    ranks, checkpoint = fsdp_run.ranks, fsdp_run.checkpoint
    for rank in range(WORLD):
        assert_rel_close(ranks[rank]["losses"], fsdp_run.losses[rank], f"rank {rank} losses")
    for name in REPLICATED:  # rank 0's at the start (broadcast before sharding), and equal after the step
        assert torch.equal(ranks[1]["initial_replicated"][name], ranks[0]["initial_replicated"][name]), name
        assert torch.equal(ranks[1]["replicated"][name], ranks[0]["replicated"][name]), name

    seen = ranks[0]["gradients"]
    assert seen.keys() == fsdp_run.gradients.keys()
    for name, grad in fsdp_run.gradients.items():
        assert_rel_close(seen[name], grad, f"gradient of {name}")

    final, initial = checkpoint["model"], ranks[0]["initial"]
    expected, momentum = fsdp_run.stepped.state_dict(), fsdp_run.halves[0].state_dict()
    for name, tensor in final.items():
        if name.endswith("queue") or name == "queue_ptr":
            continue
        reference = momentum[name] if "_m." in name else expected[name]
        assert_rel_close(tensor, reference, name)
    assert int(final["queue_ptr"]) == WORLD * BATCH
    for queue in ("image_queue", "text_queue"):
        for rank in range(WORLD):
            assert_rel_close(final[queue][:, rank * BATCH:(rank + 1) * BATCH],
                   fsdp_run.halves[rank].state_dict()[queue][:, :BATCH], f"{queue} columns of rank {rank}")
        assert torch.equal(final[queue][:, WORLD * BATCH:], initial[queue][:, WORLD * BATCH:])
        assert torch.equal(final[queue], ranks[0]["replicated"][queue])


def test_fsdp_checkpoint_is_a_single_process_checkpoint(fsdp_run):
    checkpoint = fsdp_run.checkpoint
    model = BlipPretrain(fsdp_run.config.model_config())
    model.load_state_dict(checkpoint["model"])  # strict: the same keys, shapes and shared names
    optimizer = build_optimizer(model, fsdp_run.config.optim, torch.device("cpu"))
    optimizer.load_state_dict(checkpoint["optimizer"])

    expected = fsdp_run.optimizer.state_dict()
    saved = checkpoint["optimizer"]
    assert saved["param_groups"] == expected["param_groups"]
    assert saved["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        for key, value in state.items():
            assert_rel_close(saved["state"][index][key], value, f"optimizer {key} of parameter {index}")

    # a new FSDP run resumed from it holds exactly what was saved
    rank0 = fsdp_run.ranks[0]
    assert rank0["resumed_model"].keys() == checkpoint["model"].keys()
    for name, tensor in checkpoint["model"].items():
        assert torch.equal(rank0["resumed_model"][name], tensor), name
    # torch.distributed.checkpoint hands tuples back as lists (AdamW reads its betas either way)
    assert [g | {"betas": tuple(g["betas"])} for g in rank0["resumed_optimizer"]["param_groups"]] == \
        saved["param_groups"]
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(rank0["resumed_optimizer"]["state"][index][key], value), (index, key)


# -- bf16: FSDP2's MixedPrecisionPolicy ------------------------------------------------------------------------

BF16_STEPS = 3


def _bf16_rank_main(rank, port, synthetic_dir, out, batches, distributed):
    """Three bf16 steps on this rank's batch; under FSDP also the dtypes a block's weights have in its forward."""
    from blip_fast.train.pretraining import Pretrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    config = load_pretrain_config(None, tiny_overrides(
        synthetic_dir, out, "optim.warmup_steps=0", "train.device=cpu", f"train.distributed={distributed}",
        "optim.temp_lr=null", "train.precision=bf16"))
    trainer = Pretrainer(config, printer=lambda *_: None)
    try:
        seen = {}
        block = getattr(trainer.model, "module", trainer.model).visual_encoder.blocks[0]  # DDP may wrap it

        def record_weight_dtype(module, _inputs):  # returns None: a pre-hook's result would replace the inputs
            seen.setdefault("forward", module.attn.qkv.weight.dtype)

        block.register_forward_pre_hook(record_weight_dtype)
        losses = [trainer.train_step([SimpleNamespace(**batches[rank])]) for _ in range(BF16_STEPS)]
        seen["stored"] = block.attn.qkv.weight.dtype  # what AdamW steps on
        torch.save({"losses": torch.stack(losses), "dtypes": seen}, out / f"{distributed}{rank}.pt")
    finally:
        trainer.close()


def test_fsdp_bf16_gathers_bf16_weights_and_tracks_ddp(synthetic_dir, tmp_path):
    """``train.precision=bf16`` under FSDP2: blocks gather and compute with bf16 weights (half the all-gather
    traffic) while AdamW keeps fp32 shards, and its losses follow DDP's bf16 autocast run on the same batches.
    Tolerance 2e-2 relative: the two round the same matmul inputs to bf16, but FSDP also rounds the LayerNorm
    and embedding weights (bf16 has an 8-bit mantissa, 4e-3 per rounding), and three steps compound it."""
    batches = rank_batches(synthetic_dir)
    runs = {}
    for distributed in ("ddp", "fsdp"):
        mp.spawn(_bf16_rank_main, args=(free_port(), synthetic_dir, tmp_path, batches, distributed), nprocs=WORLD,
                 join=True)
        runs[distributed] = [torch.load(tmp_path / f"{distributed}{r}.pt", weights_only=True) for r in range(WORLD)]
    for rank in range(WORLD):
        fsdp_rank, ddp_rank = runs["fsdp"][rank], runs["ddp"][rank]
        assert fsdp_rank["dtypes"] == {"forward": torch.bfloat16, "stored": torch.float32}
        assert ddp_rank["dtypes"] == {"forward": torch.float32, "stored": torch.float32}  # autocast casts per op
        assert_rel_close(fsdp_rank["losses"], ddp_rank["losses"], f"rank {rank} bf16 losses", tolerance=2e-2)
