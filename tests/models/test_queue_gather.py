"""The queues' all-gather on two gloo processes against one process on the concatenated batch.

Each rank writes its momentum features (and, for retrieval, its image ids) through the model's ``enqueue``; the
queues and pointers must equal those of one process that enqueues both ranks' rows in rank order, over steps that
wrap around a queue whose length is not a multiple of the global batch. Copies only: equality is exact. Each
pretraining enqueue is one collective, both modalities side by side.
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blip_fast.config import tiny_config
from blip_fast.models import BlipPretrain, BlipRetrieval

WORLD, BATCH, QUEUE, STEPS = 2, 3, 10, 4  # global batch 6: the second step wraps


def _model(kind):
    torch.manual_seed(0)
    config = tiny_config(image_size=32)
    config.queue_size = QUEUE
    return (BlipPretrain if kind == "pretrain" else BlipRetrieval)(config)


def _step_rows(step, dim):
    """Both ranks' rows of one step: image and text features (WORLD * BATCH, dim), image ids (WORLD * BATCH,)."""
    generator = torch.Generator().manual_seed(100 + step)
    image, text = (torch.randn(WORLD * BATCH, dim, generator=generator) for _ in range(2))
    return image, text, torch.randint(0, 50, (WORLD * BATCH,), generator=generator)


def _enqueue(model, kind, image, text, ids):
    if kind == "pretrain":
        model.enqueue(image, text)
    else:
        model.enqueue(image, text, ids)


def _state(model):
    return {name: buffer.clone() for name, buffer in model.named_buffers() if "queue" in name or "ptr" in name}


def _rank_main(rank, port, kind, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model(kind)
        collectives = []
        gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)

        def counted(output, tensor, *args, **kwargs):
            collectives.append(tuple(tensor.shape))
            return gather(output, tensor, *args, **kwargs)

        dist.all_gather_single = dist.all_gather_into_tensor = counted
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        for step in range(STEPS):
            image, text, ids = _step_rows(step, model.config.embed_dim)
            # retrieval gathers the ids in its forward and hands every rank's to enqueue
            _enqueue(model, kind, image[rows], text[rows], ids)
        torch.save({"state": _state(model), "collectives": collectives}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(kind, tmp_path):
    mp.spawn(_rank_main, args=(_free_port(), kind, tmp_path), nprocs=WORLD)
    single = _model(kind)
    for step in range(STEPS):
        _enqueue(single, kind, *_step_rows(step, single.config.embed_dim))
    want = _state(single)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["state"].keys() == want.keys()
        for name, tensor in want.items():
            assert torch.equal(got["state"][name], tensor), f"rank {rank}: {name}"
        # one (B, 2D) gather per step: both modalities travel together
        dim = single.config.embed_dim
        assert got["collectives"] == [(BATCH, 2 * dim)] * STEPS


def test_pretraining_queues_gather_every_rank_like_one_process(tmp_path):
    _check("pretrain", tmp_path)


def test_retrieval_queues_and_ids_gather_every_rank_like_one_process(tmp_path):
    _check("retrieval", tmp_path)
