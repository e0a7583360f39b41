"""Momentum update and queue: the torch backends against the original's arithmetic.

Tolerances: momentum update |err| <= tol * (1 + |x|) with tol 1e-6 in fp32 (the same update written
as a lerp, another kernel), 2e-3 fp16, 2e-2 bf16 (one rounding to the dtype); the queue is a copy: exact.
"""

import pytest
import torch

from blip_fast import ops
from blip_fast.ops.momentum import enqueue_ref, enqueue_scatter, momentum_update_foreach, momentum_update_ref
from blip_fast.shapes import HEAD_DIM, IMAGE_TOKENS_224, PRETRAIN_BATCH, QUEUE_SIZE


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_foreach_momentum_update_matches_original(dtype, tol):
    shapes = [(7, 3), (1,), (IMAGE_TOKENS_224, HEAD_DIM), (13, 5, 2)]
    online = [torch.randn(s).to(dtype) for s in shapes]
    momentum = [torch.randn(s).to(dtype) for s in shapes]
    expected = [m.float() * 0.995 + p.float() * 0.005 for m, p in zip(momentum, online, strict=True)]
    ref = [m.clone() for m in momentum]
    fast = [m.clone() for m in momentum]
    momentum_update_ref(ref, online, 0.995)
    momentum_update_foreach(fast, online, 0.995)
    for r, f, e in zip(ref, fast, expected, strict=True):
        # one rounding to the dtype: relative to the magnitude
        assert ((r.float() - e).abs() <= tol * (1 + e.abs())).all()
        assert ((f.float() - e).abs() <= tol * (1 + e.abs())).all()


def test_momentum_update_through_parameters():
    online = torch.nn.Linear(4, 3)
    twin = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in twin.parameters()]
    ops.momentum_update_(twin.parameters(), online.parameters(), 0.9)
    for p_m, p0, p in zip(twin.parameters(), before, online.parameters(), strict=True):
        assert torch.allclose(p_m, 0.9 * p0 + 0.1 * p, atol=1e-7)


def test_foreach_rejects_unequal_lists():
    with pytest.raises(ValueError, match="momentum tensors"):
        momentum_update_foreach([torch.zeros(1)], [], 0.9)


@pytest.mark.parametrize("size,batch,start", [(12, 4, 0), (12, 4, 8), (12, 3, 9),
                                              (QUEUE_SIZE, PRETRAIN_BATCH, QUEUE_SIZE - PRETRAIN_BATCH)])
def test_enqueue_backends_agree_when_the_original_applies(size, batch, start):
    queue = torch.randn(5, size)
    feats = torch.randn(batch, 5)
    results = []
    for fn in (enqueue_ref, enqueue_scatter):
        q, p = queue.clone(), torch.tensor([start])
        fn(q, p, feats)
        results.append((q, p))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[1][0][:, start:start + batch], feats.t())
    assert results[1][1].item() == (start + batch) % size


def test_scatter_enqueue_wraps_around_any_batch():
    queue, ptr = torch.zeros(2, 10), torch.tensor([8])
    feats = torch.arange(8.0).view(4, 2)
    enqueue_scatter(queue, ptr, feats)
    assert ptr.item() == 2
    assert torch.equal(queue[:, [8, 9, 0, 1]], feats.t())
    assert torch.equal(queue[:, 2:8], torch.zeros(2, 6))


def test_original_enqueue_refuses_batches_that_do_not_divide_the_queue():
    with pytest.raises(ValueError, match="multiple of the global batch"):
        enqueue_ref(torch.zeros(2, 10), torch.tensor([0]), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="does not fit"):
        enqueue_scatter(torch.zeros(2, 10), torch.tensor([0]), torch.zeros(11, 2))
