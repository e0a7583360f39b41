"""What the comparisons with the original BLIP (tests/test_original_*.py) share: the harness, its marker, the small
configuration both sides are built from, and the gradient check."""

import importlib.util
import sys
from pathlib import Path

import pytest

from blip_fast.config import TextConfig, preset

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
CAPTIONS = ["a red cube to the left of a small blue sphere", "two green balls",
            "a yellow cylinder behind a large grey cube", "a purple sphere"]


def benchmark_script(name):
    """A benchmarks/ script, imported under the name bench_step gives it (so both share one module)."""
    module_name = f"blip_fast_benchmarks_{name}" if name == "original_blip" else f"bench_{name}_under_test"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


original_blip = benchmark_script("original_blip")
needs_original = pytest.mark.original(available=original_blip.is_available(), install=original_blip.INSTALL_HINT)


def small_config(drop_path_rate: float = 0.0, text_layers: int = 2):
    """ViT-B/16 at 32 px (the original has ViT-B and ViT-L only; 4 patches keep it cheap on CPU) and a 64-wide text
    transformer, dropout 0."""
    config = preset("base", image_size=32)
    config.vision.drop_path_rate = drop_path_rate
    config.text = TextConfig(hidden_size=64, num_layers=text_layers, num_heads=4, intermediate_size=128,
                             max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
    config.embed_dim = 32
    config.queue_size = 8  # the original's enqueue needs queue_size % batch == 0
    return config


def assert_same_gradients(ours, original) -> None:
    """Every parameter's gradient within 1e-4 of the largest of that tensor's (the same ones None), >100 compared."""
    original_params = dict(original.named_parameters())
    compared = 0
    for name, param in ours.named_parameters():
        ours_grad, original_grad = param.grad, original_params[name].grad
        assert (ours_grad is None) == (original_grad is None), name
        if ours_grad is None:
            continue
        error = (ours_grad - original_grad).abs().max().item()
        assert error <= 1e-4 * original_grad.abs().max().item() + 1e-9, f"{name}: gradient off by {error:.3g}"
        compared += 1
    assert compared > 100
