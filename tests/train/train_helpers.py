"""Shared by the engine tests."""

import socket

import torch


def tiny_overrides(synthetic_dir, out, *extra):
    """The tiny-synthetic config shrunk for tests: batch 8, no workers, no TensorBoard, no evaluation."""
    return [f"data.synthetic_dir={synthetic_dir}", "data.synthetic_n=600", "data.batch_size=8", "data.num_workers=0",
            f"train.out={out}", "train.tensorboard=false", "train.eval_size=0", "train.log_every=2",
            "optim.warmup_steps=3", *extra]


WORLD = 2   # processes of the distributed tests
BATCH = 8   # pairs per rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_batches(synthetic_dir, packed: bool = True):
    """The first WORLD x BATCH training pairs, evaluation-transformed and tokenized, split into one batch per rank;
    ``packed``: with the captions' packing, as the trainer makes it by default."""
    from blip_fast.data.annotations import CaptionAnnotations
    from blip_fast.data.decode import decode_image, read_image_file
    from blip_fast.data.transforms import TransformConfig, eval_transform
    from blip_fast.text import BlipTokenizer

    source = CaptionAnnotations([synthetic_dir / "train.json"], synthetic_dir)
    samples = [source.sample(i, None) for i in range(WORLD * BATCH)]
    images = torch.stack([eval_transform(decode_image(read_image_file(s.image_path)), TransformConfig.eval(64))
                          for s in samples])
    from blip_fast.models.packing import PackedText
    from blip_fast.train.pretraining import PACKED_TOKENS_MULTIPLE

    tokens = BlipTokenizer()([s.caption for s in samples], max_length=30)
    batches = []
    for r in range(WORLD):
        rows = slice(r * BATCH, (r + 1) * BATCH)
        mask = tokens.attention_mask[rows]
        batches.append({"images": images[rows], "input_ids": tokens.input_ids[rows], "attention_mask": mask,
                        "packing": PackedText.from_mask(mask, PACKED_TOKENS_MULTIPLE) if packed else None})
    return batches


def assert_rel_close(a, b, what, tolerance=1e-6):
    """Max |a - b| within ``tolerance`` of max |a| (the distributed tests' bound)."""
    scale = max(a.abs().max().item(), 1e-12)
    assert (a - b).abs().max().item() <= tolerance * scale, what


def synthetic_step_batch(size: int, seed: int, device, max_length: int = 30, image_size: int = 64,
                         pack_multiple: int | None = None):
    """One training batch as the step takes it: Gaussian-noise images and tokenized synthetic captions (padded to
    the longest; with ``pack_multiple``, also their packing), on ``device``."""
    import random
    from types import SimpleNamespace

    from blip_fast.data.synthetic import caption, random_scene
    from blip_fast.models.packing import PackedText
    from blip_fast.text import BlipTokenizer

    rng = random.Random(seed)
    tokens = BlipTokenizer()([caption(random_scene(rng)) for _ in range(size)], max_length=max_length)
    images = torch.randn(size, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    packing = None if pack_multiple is None else PackedText.from_mask(tokens.attention_mask, pack_multiple).to(device)
    return SimpleNamespace(images=images.to(device), input_ids=tokens.input_ids.to(device),
                           attention_mask=tokens.attention_mask.to(device), packing=packing)
