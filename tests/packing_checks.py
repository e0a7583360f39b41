"""Captions and comparisons shared by the tests of packed captions (tests/models/test_packing.py and the packed
attention kernel's, tests/kernels/test_packed_attention_model.py)."""

import torch
from tensor_checks import rel_err

from blip_fast.config import tiny_config

CAPTION_LENGTHS = [7, 11, 4, 13, 9, 6]  # padded to 13; 6 divides the tiny queue


def captions(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1000, 5000, (length,), generator=gen)
        ids[row, 0], ids[row, length - 1] = 101, 102
    return ids, (ids != 0).long()


def no_dropout_config():
    config = tiny_config()
    config.text.attention_dropout = config.text.hidden_dropout = 0.0
    return config


def assert_grads_match(grads: dict, expected: dict, rtol: float) -> None:
    assert grads.keys() == expected.keys()
    assert [n for n, g in expected.items() if g is None] == [], "parameters without gradient"
    errors = {}
    for name, want in expected.items():
        if name.endswith("attention.self.key.bias"):  # a vanishing gradient: on the key weight's scale
            scale = expected[name[: -len("bias")] + "weight"].abs().max()
            errors[name] = ((grads[name] - want).abs().max() / scale).item()
        else:
            errors[name] = rel_err(grads[name], want)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{len(errors)} gradients; worst {worst}: rel err {errors[worst]:.3g} > {rtol}"
