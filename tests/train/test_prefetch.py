"""The batches' copies to the GPU, started one batch ahead on a side stream (blip_fast.train.prefetch).

On a CPU the trainer copies as it takes each batch; the read-ahead's order and its exact resume are tested with
the batches themselves (tests/data/test_batches.py). The side stream's copies are ``gpu`` tests.
"""

import pytest
import torch

from blip_fast.data.batches import CaptionBatch
from blip_fast.models.packing import PackedText
from blip_fast.train.prefetch import BatchCopies, batch_tensors


def make_batch(rows=3, length=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = (torch.arange(length)[None] < torch.tensor([[7], [4], [2]])[:rows]).long()
    return CaptionBatch(torch.randn(rows, 3, 8, 8, generator=generator),
                        torch.randint(1, 1000, (rows, length), generator=generator) * mask, mask,
                        [f"k{i}" for i in range(rows)])


def packed(batch):
    batch.packing = PackedText.from_mask(batch.attention_mask)
    return batch


def test_batch_tensors_are_every_field_and_the_packing():
    batch = packed(make_batch())
    tensors = list(batch_tensors(batch))
    expected = [batch.images, batch.input_ids, batch.attention_mask, *batch.packing]
    assert len(tensors) == len(expected) and all(a is b for a, b in zip(tensors, expected, strict=True))


def test_on_a_cpu_a_batch_is_prepared_and_taken_as_it_comes():
    copies = BatchCopies(torch.device("cpu"), packed)
    assert not copies.reads_ahead
    batch = make_batch()
    taken = copies.take(batch)
    assert taken.packing is not None and torch.equal(taken.images, batch.images)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_copy_started_while_the_gpu_is_busy_is_whole_when_taken():
    """The copy runs on its own stream while the current one is busy; taking it makes the current stream wait, so a
    kernel queued after ``take`` reads the whole batch, and the batch's memory is marked as used there."""
    device = torch.device("cuda")
    copies = BatchCopies(device, packed)
    assert copies.reads_ahead
    host = make_batch().pin_memory()
    busy = torch.randn(4096, 4096, device=device)
    for _ in range(20):  # tens of milliseconds queued on the current stream
        busy = busy @ busy / 64
    started = copies.start(host)
    assert started.batch.images.device.type == "cuda"
    taken = copies.take(started)
    sums = [t.double().sum() for t in batch_tensors(taken)]  # queued after take: read after the copy
    expected = [t.double().sum() for t in batch_tensors(packed(make_batch()))]
    assert [float(s) for s in sums] == pytest.approx([float(s) for s in expected])
    torch.cuda.synchronize()
