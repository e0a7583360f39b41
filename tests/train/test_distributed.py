"""Two gloo processes take one DDP training step; a single process reproduces it from the same batches.

What the math says must be equal (BLIP's distributed pretraining, as the original):
* each rank's losses are those of its own batch against the (shared) queue -- ITC in-batch
  negatives and ITM hard negatives are rank-local, so they equal one process's forward on that half;
* the gradient is the average of the ranks' gradients, so the updated weights equal one AdamW
  step on ``(grad_rank0 + grad_rank1) / 2``;
* the momentum update happens once, before the forward, identically on every rank;
* the queues receive rank 0's momentum features, then rank 1's (``concat_all_gather``).
One intra-op thread everywhere, so the two computations run the same kernels in the same order:
the tolerance below (1e-6 relative) only absorbs DDP's bucketed all-reduce.
"""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from train_helpers import BATCH, WORLD, assert_rel_close, free_port, rank_batches, tiny_overrides

from blip_fast.models.blip_pretrain import BlipPretrain
from blip_fast.train.config import load_pretrain_config
from blip_fast.train.optim import build_optimizer, set_learning_rate
from blip_fast.train.schedule import learning_rate


def _overrides(synthetic_dir, out):
    return tiny_overrides(synthetic_dir, out, "optim.warmup_steps=0", "train.device=cpu")


def _rank_main(rank, port, synthetic_dir, out, batches):
    from blip_fast.train.pretraining import Pretrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Pretrainer(load_pretrain_config(None, _overrides(synthetic_dir, out)), printer=lambda *_: None)
    try:
        initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        generator = trainer.generator.get_state()
        losses = trainer.train_step([SimpleNamespace(**batches[rank])])
        torch.save({"initial": initial, "generator": generator, "losses": losses,
                    "final": trainer.model.state_dict()}, out / f"rank{rank}.pt")
    finally:
        trainer.close()






@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_ddp_step_equals_single_process_on_the_same_batches(synthetic_dir, tmp_path, packed):
    batches = rank_batches(synthetic_dir, packed)
    mp.spawn(_rank_main, args=(free_port(), synthetic_dir, tmp_path, batches), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    initial = ranks[0]["initial"]
    for name, tensor in ranks[1]["initial"].items():   # DDP gave rank 1 rank 0's weights and queues
        assert torch.equal(tensor, initial[name]), name
    for name, tensor in ranks[1]["final"].items():     # and the ranks stay identical
        assert torch.equal(tensor, ranks[0]["final"][name]), name

    torch.set_num_threads(1)
    config = load_pretrain_config(None, _overrides(synthetic_dir, tmp_path))
    halves = []
    for rank in range(WORLD):
        model = BlipPretrain(config.model_config())
        model.load_state_dict(initial)
        generator = torch.Generator().set_state(ranks[rank]["generator"])
        b = batches[rank]
        losses = model(b["images"], b["input_ids"], b["attention_mask"], alpha=0.0, generator=generator,
                       packing=b["packing"])
        stacked = torch.stack([losses[k] for k in ("itc", "itm", "lm")])
        stacked.sum().backward()
        assert_rel_close(ranks[rank]["losses"], stacked.detach(), f"rank {rank} losses")
        halves.append(model)

    stepped = BlipPretrain(config.model_config())
    stepped.load_state_dict(initial)
    optimizer = build_optimizer(stepped, config.optim, torch.device("cpu"))
    set_learning_rate(optimizer, learning_rate(config.optim, 0, 0, config.train.epochs))
    for param, *replicas in zip(stepped.parameters(), *(m.parameters() for m in halves), strict=True):
        if param.requires_grad:
            param.grad = sum(r.grad for r in replicas) / WORLD
    optimizer.step()

    final = ranks[0]["final"]
    expected = stepped.state_dict()
    momentum = halves[0].state_dict()
    for name, tensor in final.items():
        if name.endswith("queue") or name == "queue_ptr":
            continue
        reference = momentum[name] if "_m." in name else expected[name]
        assert_rel_close(tensor.float(), reference.float(), name)
    assert int(final["queue_ptr"]) == WORLD * BATCH
    for queue in ("image_queue", "text_queue"):
        for rank in range(WORLD):
            assert_rel_close(final[queue][:, rank * BATCH:(rank + 1) * BATCH],
                             halves[rank].state_dict()[queue][:, :BATCH], f"{queue} columns of rank {rank}")
        assert torch.equal(final[queue][:, WORLD * BATCH:], initial[queue][:, WORLD * BATCH:])


def _synth_failure_rank(rank, port, out, folder):
    from blip_fast.train.pretraining import Pretrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    config = load_pretrain_config(None, [f"data.synthetic_dir={folder}", "data.synthetic_n=40", "data.batch_size=4",
                                         "model.queue_size=8", "train.device=cpu", f"train.out={out}",
                                         "train.tensorboard=false"])
    try:
        Pretrainer(config, printer=lambda *_: None).close()
        message = "no error"
    except Exception as error:  # noqa: BLE001 -- the test records what each rank raised
        message = f"{type(error).__name__}: {error}"
    (out / f"rank{rank}.txt").write_text(message)


def test_a_synthetic_dataset_rank_0_cannot_write_stops_every_rank(tmp_path):
    # rank 0 writes the built-in dataset while the others wait; when it cannot (here: a folder of someone else's
    # files), every rank stops with the reason instead of waiting at a barrier forever
    import time

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a dataset")
    context = mp.spawn(_synth_failure_rank, args=(free_port(), tmp_path, folder), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("a rank still waits for rank 0's dataset")
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert messages[0].startswith("ValueError:") and "is not empty and is not a dataset" in messages[0]
    for message in messages[1:]:
        assert message.startswith("ConfigError: rank 0 could not write the synthetic dataset to"), message
        assert "is not empty and is not a dataset" in message
    assert (folder / "notes.txt").read_text() == "not a dataset"
