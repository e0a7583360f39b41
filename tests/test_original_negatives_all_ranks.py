"""Retrieval fine-tuning with ``negative_all_rank`` (the original's COCO setting) on two gloo ranks: ITM's hard
negatives drawn from every rank's pairs, the negative image's tokens gathered with their gradient. Each rank's
losses and gradients equal the original ``BLIP_Retrieval.forward`` run on the same two ranks from the same weights,
both drawing the hardest negative (fp32, one intra-op thread; losses 1e-5 relative, gradients 1e-4 of each
tensor's largest, as tests/test_original_finetune.py)."""

import os
import socket

import torch
import torch.multiprocessing as mp
from original_checks import CAPTIONS, assert_same_gradients, needs_original, original_blip, small_config

from blip_fast.models import BlipRetrieval
from blip_fast.text import BlipTokenizer

WORLD = 2
# image 1's two captions straddle the ranks: the same-image mask must come from every rank's ids
IMAGE_IDS = torch.tensor([0, 1, 1, 2, 2, 3])
PAIR_CAPTIONS = CAPTIONS + ["a small grey cube", "three spheres in a row"]


def hardest_negative(weights, num_samples, generator=None, **_):
    assert num_samples == 1
    return weights.argmax(dim=-1, keepdim=True)


def _rank_main(rank, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        config = small_config()
        config.queue_size, config.negative_all_rank = 12, True
        ours = BlipRetrieval(config).train()
        original = original_blip.build_original_retrieval(config).train()
        original.load_state_dict(ours.state_dict(), strict=False)
        rows = slice(rank * 3, rank * 3 + 3)
        captions = PAIR_CAPTIONS[rows]
        tokens = BlipTokenizer()(captions, max_length=35, padding="max_length")
        pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))[rows]
        torch.multinomial = hardest_negative  # this process only
        losses = ours(pixels, tokens.input_ids, tokens.attention_mask, IMAGE_IDS[rows], alpha=0.4)
        loss_ita, loss_itm = original(pixels, captions, 0.4, IMAGE_IDS[rows])
        torch.testing.assert_close(losses["itc"], loss_ita.detach(), rtol=1e-5, atol=0)
        torch.testing.assert_close(losses["itm"], loss_itm.detach(), rtol=1e-5, atol=0)
        (losses["itc"] + losses["itm"]).backward()
        (loss_ita + loss_itm).backward()
        assert_same_gradients(ours, original)
        (out / f"rank{rank}.ok").write_text("compared")
    finally:
        dist.destroy_process_group()


@needs_original
def test_negatives_from_every_rank_match_the_original_on_two_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, tmp_path), nprocs=WORLD, join=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok"]
