"""BLIP's PIL image transforms: parameter ranges and rates of the random draws, the RandomAugment ops
against PIL's and OpenCV's definitions, normalisation, reproducibility.

Tolerances: the geometric ops against an independent bilinear warp in OpenCV's convention may be
1 level of 255 apart (rounding of the interpolated value); everything else is exact.
"""

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from blip_fast.config import ConfigError
from blip_fast.data.transforms import (
    BLIP_AUGMENTS,
    MEAN,
    STD,
    AugmentOp,
    CropBox,
    PilTransform,
    TrainParams,
    TransformConfig,
    apply_augment_op,
    apply_train_params,
    eval_transform,
    random_resized_crop_params,
    sample_augment_ops,
    sample_train_params,
    train_transform,
)
from blip_fast.images import to_batch

DRAWS = 4000


def photo(seed: int, width: int = 96, height: int = 72) -> Image.Image:
    """A small photo-like RGB image: a smooth colour field with grain (never flat)."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(low).astype(np.int16) + rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

def test_presets_follow_the_original():
    assert TransformConfig.pretrain().scale == (0.2, 1.0)
    assert TransformConfig.pretrain().image_size == 224
    assert TransformConfig.finetune().scale == (0.5, 1.0)
    assert TransformConfig.finetune().augment_ops == BLIP_AUGMENTS
    assert (TransformConfig().augment_n, TransformConfig().augment_m, TransformConfig().augment_prob) == (2, 5.0, 0.5)
    assert not TransformConfig.eval().train
    assert TransformConfig.eval().active_augment_ops == ()
    assert TransformConfig.finetune(randaugment=False).active_augment_ops == ()
    assert TransformConfig.pretrain(max_scale=0.8).scale == (0.2, 0.8)      # LAVIS's option


@pytest.mark.parametrize("bad", [
    {"kind": "train"}, {"image_size": 4}, {"image_size": 224.0}, {"min_scale": 0.0},
    {"min_scale": 0.9, "max_scale": 0.5}, {"max_scale": 1.5}, {"augment_n": -1}, {"augment_m": 11},
    {"augment_prob": 1.5}, {"augment_ops": ("Solarize",)}, {"augment_ops": ()}, {"dtype": "float64"},
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        TransformConfig(**bad)


# ---------------------------------------------------------------------------------------------
# Random parameters
# ---------------------------------------------------------------------------------------------

def centre_fallback(width, height):
    """torchvision's box after 10 failed tries: the whole image, cut to the nearest allowed aspect ratio."""
    if width / height > 4 / 3:
        w, h = round(height * 4 / 3), height
    elif width / height < 3 / 4:
        w, h = width, round(width * 4 / 3)
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 300), (97, 35)])
@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.5, 1.0)])
def test_crop_area_and_aspect_ratio_stay_in_range(size, scale):
    """Every window lies in the image with area and aspect ratio in range (up to the rounding of w and h),
    unless all 10 tries failed; on 97x35 (wider than 4:3) big windows never fit and draws fall back."""
    width, height = size
    rng = np.random.default_rng(1)
    fractions, log_ratios, fallbacks = [], [], 0
    for _ in range(DRAWS):
        box = random_resized_crop_params(width, height, scale, rng)
        assert 0 <= box.left and box.left + box.width <= width and 0 <= box.top and box.top + box.height <= height
        w, h = box.width, box.height
        if box == centre_fallback(width, height) and (w + 0.5) * (h + 0.5) < scale[0] * width * height:
            fallbacks += 1
            continue
        # w and h are rounded from exact values inside the ranges: bound them by +-0.5 pixel
        assert (w - 0.5) * (h - 0.5) <= scale[1] * width * height + 1e-9
        assert (w + 0.5) * (h + 0.5) >= scale[0] * width * height - 1e-9
        assert (w - 0.5) / (h + 0.5) <= 4 / 3 + 1e-9 and (w + 0.5) / (h - 0.5) >= 3 / 4 - 1e-9
        fractions.append(w * h / (width * height))
        log_ratios.append(math.log(w / h))
    fractions, log_ratios = np.array(fractions), np.array(log_ratios)
    if size == (97, 35):
        # an area >= 50% needs w >= 49 at h <= 35, wider than 4:3: every draw falls back to 47x35
        assert fallbacks == (DRAWS if scale[0] == 0.5 else 0)
        assert len(fractions) == 0 or fractions.max() < 0.5
        return
    assert fallbacks == 0
    # the draws cover their ranges (area uniform in scale, log aspect ratio uniform)
    assert fractions.min() < scale[0] + 0.05 and fractions.max() > 0.95
    assert log_ratios.min() < math.log(3 / 4) + 0.05 and log_ratios.max() > math.log(4 / 3) - 0.05
    if width == height:                                 # no window is rejected for its shape: centred
        assert abs(np.mean(log_ratios)) < 0.03


def test_crop_falls_back_to_a_centre_crop_after_ten_tries():
    # a 10:1 panorama: no window with aspect ratio <= 4/3 and area >= 20% fits, every try fails
    rng = np.random.default_rng(0)
    boxes = {random_resized_crop_params(1000, 100, (0.2, 1.0), rng) for _ in range(50)}
    assert boxes == {CropBox(top=0, left=(1000 - 133) // 2, height=100, width=133)} == {centre_fallback(1000, 100)}
    boxes = {random_resized_crop_params(100, 1000, (0.2, 1.0), rng) for _ in range(50)}
    assert boxes == {CropBox(top=(1000 - 133) // 2, left=0, height=133, width=100)} == {centre_fallback(100, 1000)}


def test_flip_rate_is_one_half():
    config = TransformConfig.pretrain()
    rng = np.random.default_rng(2)
    flips = [sample_train_params(config, 640, 480, rng).flip for _ in range(DRAWS)]
    assert abs(np.mean(flips) - 0.5) < 0.04                 # 5 sigma of a binomial(4000, 0.5) rate


@pytest.mark.parametrize("m, expected", [
    (5.0, {"Brightness": 1.0, "Sharpness": 1.0, "ShearX": 0.15, "ShearY": 0.15, "TranslateX": 5.0,
           "TranslateY": 5.0, "Rotate": 15.0}),
    (3.0, {"Brightness": 0.64, "Sharpness": 0.64, "ShearX": 0.09, "ShearY": 0.09, "TranslateX": 3.0,
           "TranslateY": 3.0, "Rotate": 9.0}),
])
def test_randaugment_draws_two_ops_with_the_original_magnitudes(m, expected):
    config = TransformConfig.finetune(augment_m=m)
    rng = np.random.default_rng(3)
    drawn_counts, applied_counts, signs = Counter(), Counter(), Counter()
    for _ in range(DRAWS):
        drawn, applied = sample_augment_ops(config, rng)
        assert len(drawn) == 2 and set(drawn) <= set(BLIP_AUGMENTS) and len(applied) <= 2
        drawn_counts.update(drawn)
        for op in applied:
            applied_counts[op.name] += 1
            if op.name in ("Identity", "AutoContrast", "Equalize"):
                assert op.arg is None
            elif op.name in ("Brightness", "Sharpness"):
                assert op.arg == pytest.approx(expected[op.name])
            else:
                assert abs(op.arg) == pytest.approx(expected[op.name])
                signs[op.name, op.arg > 0] += 1
    total = 2 * DRAWS
    for name in BLIP_AUGMENTS:                               # uniform over the 10 ops, with replacement
        assert abs(drawn_counts[name] / total - 0.1) < 0.02
        assert abs(applied_counts[name] / drawn_counts[name] - 0.5) < 0.1
    for name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        positive, negative = signs[name, True], signs[name, False]
        assert abs(positive / (positive + negative) - 0.5) < 0.1
    # with replacement: the same op is drawn twice about 10% of the time
    same = sum(len(set(sample_augment_ops(config, rng)[0])) == 1 for _ in range(DRAWS)) / DRAWS
    assert abs(same - 0.1) < 0.03


def test_applied_ops_keep_the_drawn_order():
    config = TransformConfig.finetune(augment_prob=1.0)
    rng = np.random.default_rng(4)
    for _ in range(200):
        drawn, applied = sample_augment_ops(config, rng)
        assert tuple(op.name for op in applied) == drawn


def test_no_augment_draws_without_randaugment():
    rng = np.random.default_rng(5)
    for config in (TransformConfig.finetune(randaugment=False), TransformConfig.finetune(augment_n=0)):
        params = sample_train_params(config, 64, 64, rng)
        assert params.drawn == () and params.applied == ()


# ---------------------------------------------------------------------------------------------
# RandomAugment ops
# ---------------------------------------------------------------------------------------------

def opencv_warp(pixels, name, arg):
    """cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT 128) of randaugment.py's maps, in float64 (pixel centres
    at integers; rotation about (W/2, H/2) with getRotationMatrix2D's matrix)."""
    h, w = pixels.shape[:2]
    forward = np.eye(3)
    if name == "Rotate":
        a, b = math.cos(math.radians(arg)), math.sin(math.radians(arg))
        forward[:2] = [[a, b, (1 - a) * w / 2 - b * h / 2], [-b, a, b * w / 2 + (1 - a) * h / 2]]
    elif name == "ShearX":
        forward[0, 1] = arg
    elif name == "ShearY":
        forward[1, 0] = arg
    elif name == "TranslateX":
        forward[0, 2] = -arg
    else:
        forward[1, 2] = -arg
    inverse = np.linalg.inv(forward)
    ys, xs = np.mgrid[0:h, 0:w]
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]

    def at(y, x):
        inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        values = np.full(x.shape + (3,), 128.0)
        values[inside] = pixels[y[inside], x[inside]]
        return values

    return (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy)
            + at(y0 + 1, x0) * (1 - fx) * fy + at(y0 + 1, x0 + 1) * fx * fy)


@pytest.mark.parametrize("name, arg", [("Rotate", 15.0), ("Rotate", -15.0), ("ShearX", 0.15), ("ShearX", -0.15),
                                       ("ShearY", 0.15), ("ShearY", -0.15), ("TranslateX", 5.0),
                                       ("TranslateY", -5.0), ("Rotate", 9.0), ("TranslateX", 2.5)])
@pytest.mark.parametrize("size", [(40, 50), (224, 224), (37, 23)])
def test_geometric_ops_follow_opencv_maps(name, arg, size):
    pixels = np.asarray(photo(7, *size))
    out = apply_augment_op(pixels, AugmentOp(name, arg)).astype(np.float64)
    diff = np.abs(out - opencv_warp(pixels, name, arg))
    assert diff.max() <= 1.0 + 1e-6, f"{name}({arg}) on {size}: max diff {diff.max():.3f}"


def test_translate_moves_by_whole_pixels_and_fills_grey():
    pixels = np.asarray(photo(8, 50, 40))
    out = apply_augment_op(pixels, AugmentOp("TranslateX", 5.0))   # content moves left (matrix [1, 0, -5])
    assert np.array_equal(out[:, :-5], pixels[:, 5:]) and (out[:, -5:] == 128).all()
    out = apply_augment_op(pixels, AugmentOp("TranslateY", -5.0))
    assert np.array_equal(out[5:], pixels[:-5]) and (out[:5] == 128).all()


def test_rotate_positive_is_counter_clockwise():
    pixels = np.full((64, 64, 3), 0, np.uint8)
    pixels[28:36, 48:64] = 255                                       # a bar on the right, middle height
    out = apply_augment_op(pixels, AugmentOp("Rotate", 15.0))
    ys, xs = np.nonzero(out[..., 0] > 200)
    assert ys.mean() < 31.5 and xs.mean() > 40                       # it moved up on screen


def test_autocontrast_and_equalize_match_pil_imageops():
    for seed in range(4):
        image = photo(seed, 64, 48)
        low_contrast = Image.fromarray((np.asarray(image) // 4 + 90).astype(np.uint8))
        for img in (image, low_contrast):
            pixels = np.asarray(img)
            autocontrast = apply_augment_op(pixels, AugmentOp("AutoContrast"))
            assert np.array_equal(autocontrast, np.asarray(ImageOps.autocontrast(img)))
            assert np.array_equal(apply_augment_op(pixels, AugmentOp("Equalize")), np.asarray(ImageOps.equalize(img)))
    flat = np.full((8, 8, 3), 77, np.uint8)
    assert np.array_equal(apply_augment_op(flat, AugmentOp("AutoContrast")), flat)
    assert np.array_equal(apply_augment_op(flat, AugmentOp("Equalize")), flat)


def test_brightness_and_sharpness():
    pixels = np.asarray(photo(9, 64, 48))
    assert np.array_equal(apply_augment_op(pixels, AugmentOp("Brightness", 1.0)), pixels)
    assert np.array_equal(apply_augment_op(pixels, AugmentOp("Sharpness", 1.0)), pixels)
    dim = apply_augment_op(pixels, AugmentOp("Brightness", 0.64))
    assert np.array_equal(dim, np.floor(pixels.astype(np.float32) * np.float32(0.64)).astype(np.uint8))
    for factor in (0.64, 1.36):
        sharp = apply_augment_op(pixels, AugmentOp("Sharpness", factor))
        pil = np.asarray(ImageEnhance.Sharpness(Image.fromarray(pixels)).enhance(factor))
        # PIL blends with rounding, the original truncates: at most one level apart
        assert np.abs(sharp.astype(int) - pil.astype(int))[1:-1, 1:-1].max() <= 1
        border = np.ones(pixels.shape[:2], bool)
        border[1:-1, 1:-1] = False
        assert np.array_equal(sharp[border], pixels[border])
    with pytest.raises(ValueError):
        apply_augment_op(pixels, AugmentOp("Solarize", 1.0))


# ---------------------------------------------------------------------------------------------
# Whole transforms
# ---------------------------------------------------------------------------------------------

def test_normalisation_and_channel_order():
    image = Image.new("RGB", (40, 30), (255, 0, 0))
    out = eval_transform(image, TransformConfig.eval(16))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    expected = [(1.0 - MEAN[0]) / STD[0], (0.0 - MEAN[1]) / STD[1], (0.0 - MEAN[2]) / STD[2]]
    for channel in range(3):
        assert torch.allclose(out[channel], torch.full((16, 16), expected[channel]), atol=1e-6)


def test_eval_transform_gives_the_originals_pixels_to_training_and_inference():
    """``transform_test`` of the original written out with its constants (torchvision's bicubic Resize on PIL is
    PIL's, then ToTensor and Normalize), pixel for pixel: the data pipeline's transform and inference's batches."""
    image = photo(10, 97, 35)
    pixels = np.asarray(image.resize((64, 64), Image.BICUBIC), dtype=np.float32) / 255.0
    clip_mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    clip_std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    expected = torch.from_numpy((pixels - clip_mean) / clip_std).permute(2, 0, 1)
    assert torch.equal(eval_transform(image, TransformConfig.eval(64)), expected)
    assert torch.equal(to_batch(image, 64)[0], expected)
    assert eval_transform(image, TransformConfig.eval(64, dtype="bfloat16")).dtype == torch.bfloat16


def test_train_params_apply_crop_resize_flip():
    image = photo(11, 120, 90)
    config = TransformConfig.finetune(32)
    box = CropBox(top=10, left=20, height=50, width=60)
    crop = image.crop((20, 10, 80, 60)).resize((32, 32), Image.BICUBIC)
    plain = apply_train_params(image, config, TrainParams(box, flip=False))
    assert torch.equal(plain, eval_transform(crop, TransformConfig.eval(32)))
    flipped = apply_train_params(image, config, TrainParams(box, flip=True))
    assert torch.equal(flipped, plain.flip(-1))
    rotated = apply_train_params(image, config, TrainParams(box, False, ("Rotate",), (AugmentOp("Rotate", 15.0),)))
    assert not torch.equal(rotated, plain)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_train_transform_shape_dtype_range(kind, dtype):
    config = TransformConfig(image_size=48, kind=kind, dtype=dtype)
    low = torch.tensor([(0 - m) / s for m, s in zip(MEAN, STD, strict=True)]).view(3, 1, 1)
    high = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD, strict=True)]).view(3, 1, 1)
    rng = np.random.default_rng(12)
    for seed in range(8):
        out = train_transform(photo(seed, 80, 60), config, rng)
        assert out.shape == (3, 48, 48) and out.dtype == config.torch_dtype
        x = out.float()
        assert ((x >= low - 1e-2) & (x <= high + 1e-2)).all()


def test_train_transform_is_reproducible():
    config = TransformConfig.pretrain(64)
    image = photo(13, 120, 90)
    first = [train_transform(image, config, np.random.default_rng(seed)) for seed in range(6)]
    again = [train_transform(image, config, np.random.default_rng(seed)) for seed in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert len({a.sum().item() for a in first}) == 6                 # different seeds, different crops
    from_random = train_transform(image, config, random.Random(3))
    assert torch.equal(from_random, train_transform(image, config, random.Random(3)))
    assert torch.equal(train_transform(image, config, 5), train_transform(image, config, np.random.default_rng(5)))


def test_pil_transform_callable():
    image = photo(14, 120, 90)
    train = PilTransform(TransformConfig.pretrain(32), seed=1)
    a, b = train(image), train(image)
    assert not torch.equal(a, b)                                     # its own generator moves on
    again = PilTransform(TransformConfig.pretrain(32), seed=1)
    assert torch.equal(again(image), a)
    evaluate = PilTransform(TransformConfig.eval(32))
    assert torch.equal(evaluate(image), evaluate(image))
