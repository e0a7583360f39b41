"""The retrieval evaluation's re-ranking (blip_fast.evaluation.retrieval.retrieval_scores): every candidate pair
scored once, visual-major, in groups sharing a visual's keys/values; streamed image files; contexts encoded again
over the budget; and the work split over ranks. Each is compared with the plain computation: one ITM forward per
pair (fp32; 1e-5, the batch composition's rounding) or one process (same tolerance)."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from blip_fast.config import tiny_config
from blip_fast.evaluation.retrieval import ImageFiles, ImageTensors, retrieval_scores, shard
from blip_fast.models.blip_pretrain import BlipPretrain
from blip_fast.models.blip_retrieval import BlipRetrieval

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def captions(count: int, length: int = 9, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (count, length), generator=generator)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    lengths = torch.randint(3, length + 1, (count,), generator=generator)
    mask[torch.arange(length)[None, :] >= lengths[:, None]] = 0
    return ids, mask


@torch.no_grad()
def plain_scores(model, images, ids, mask, k):
    """The original's evaluation, one pair at a time: ITM logit + similarity for each direction's top k."""
    embeds = model.image_embeds(images)
    sim = model.image_features(embeds) @ model.text_features(ids, mask).t()
    enc = model.with_enc(ids)
    score_i2t, score_t2i = torch.full_like(sim, -100.0), torch.full_like(sim.t(), -100.0)

    def pair(i, t):
        return model.itm_logits(embeds[i:i + 1], enc[t:t + 1], mask[t:t + 1])[0, 1] + sim[i, t]

    for i in range(sim.shape[0]):
        for t in sim[i].topk(min(k, sim.shape[1])).indices.tolist():
            score_i2t[i, t] = pair(i, t)
    for t in range(sim.shape[1]):
        for i in sim[:, t].topk(min(k, sim.shape[0])).indices.tolist():
            score_t2i[t, i] = pair(i, t)
    return score_i2t, score_t2i


@pytest.mark.parametrize(("images", "texts", "k", "batch_size"), [
    (6, 40, 20, 64),   # up to 40 candidates a visual: groups of 16, the last of each padded
    (6, 40, 20, 5),    # groups of 5 (the batch), a chunk of 5 visuals then 1
    (3, 7, 1, 4),      # one candidate each way: groups of about 3
    (2, 2, 5, 1),      # k over both sizes, one pair a forward
])
def test_reranking_equals_one_forward_per_pair(images, texts, k, batch_size):
    torch.manual_seed(0)
    model = BlipPretrain(tiny_config()).eval()
    pixels = torch.randn(images, 3, 64, 64)
    ids, mask = captions(texts)
    got = retrieval_scores(model, pixels, ids, mask, itm_k=k, batch_size=batch_size)
    for ours, plain in zip(got, plain_scores(model, pixels, ids, mask, k), strict=True):
        torch.testing.assert_close(ours, plain, **TOLERANCE)


def test_contexts_over_the_budget_are_encoded_again():
    torch.manual_seed(0)
    model = BlipRetrieval(tiny_config()).eval()
    pixels = torch.randn(5, 3, 64, 64)
    ids, mask = captions(12)
    calls = []

    class Counted(ImageTensors):
        def encode(self, model, start, stop):
            calls.append((start, stop))
            return super().encode(model, start, stop)

    kept = retrieval_scores(model, Counted(pixels), ids, mask, itm_k=4, batch_size=2)
    assert calls == [(0, 2), (2, 4), (4, 5)]
    calls.clear()
    again = retrieval_scores(model, Counted(pixels), ids, mask, itm_k=4, batch_size=2, context_budget=0)
    assert calls == [(0, 2), (2, 4), (4, 5)] * 2
    for a, b in zip(kept, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_image_files_stream_the_decoded_images(tmp_path):
    from blip_fast.evaluation.images import evaluation_images

    torch.manual_seed(0)
    model = BlipRetrieval(tiny_config()).eval()
    generator = torch.Generator().manual_seed(3)
    paths = []
    for index in range(7):
        pixels = torch.randint(0, 256, (40 + index, 50, 3), dtype=torch.uint8, generator=generator)
        paths.append(str(tmp_path / f"{index}.png"))
        Image.fromarray(pixels.numpy()).save(paths[-1])
    ids, mask = captions(9)
    streamed = retrieval_scores(model, ImageFiles(paths, 64, workers=3), ids, mask, itm_k=3, batch_size=3)
    in_memory = retrieval_scores(model, evaluation_images(paths, 64), ids, mask, itm_k=3, batch_size=3)
    for a, b in zip(streamed, in_memory, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unreadable_image_file_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    model = BlipRetrieval(tiny_config()).eval()
    ids, mask = captions(2)
    with pytest.raises(ValueError, match="bad.jpg"):
        retrieval_scores(model, ImageFiles([str(bad)], 64), ids, mask, itm_k=1)


def test_shards_cover_every_item_once():
    for count in range(0, 12):
        for world in range(1, 5):
            parts = [shard(count, rank, world) for rank in range(world)]
            assert [i for part in parts for i in part] == list(range(count))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def _rank_main(rank, world, port, out, images, texts, k):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = BlipRetrieval(tiny_config()).eval()
        pixels = torch.randn(images, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        ids, mask = captions(texts)
        scores = retrieval_scores(model, pixels, ids, mask, itm_k=k, batch_size=3, distributed=True)
        torch.save(scores, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("world", "images", "texts", "k"), [(2, 5, 11, 4), (3, 2, 7, 2)],
                         ids=["two-ranks", "three-ranks-one-without-images"])
def test_ranks_give_the_scores_of_one_process(tmp_path, world, images, texts, k):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(world, port, tmp_path, images, texts, k), nprocs=world, join=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BlipRetrieval(tiny_config()).eval()
    pixels = torch.randn(images, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ids, mask = captions(texts)
    one = retrieval_scores(model, pixels, ids, mask, itm_k=k, batch_size=3)
    for rank in range(world):
        for got, expected in zip(torch.load(tmp_path / f"rank{rank}.pt"), one, strict=True):
            torch.testing.assert_close(got, expected, **TOLERANCE)
