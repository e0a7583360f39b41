"""The DALI pipeline (CPU here; ``gpu`` tests need CUDA) against the PIL fallback, on real JPEG files.

What is compared, and the tolerances (1 level = 1/255 of the pixel range, i.e. 1 / (255 * std) in the
normalised tensors, 0.0142-0.0150):

* evaluation transform, DALI CPU vs the PIL fallback, from the same JPEG files: max 3 levels, mean
  0.5 level. Measured on these files: max 2 levels, mean 0.15-0.2 level -- all of it from the two
  bicubic resamplers: DALI's CPU decoder (libjpeg-turbo) gives the very pixels PIL decodes (checked
  separately by feeding DALI the PIL-decoded pixels: identical results). A flipped image, swapped
  channels or ImageNet's mean/std instead of CLIP's give mean differences of 10+ levels, so the
  tolerance catches them (asserted below).
* RandomAugment ops, DALI vs PIL on the same pixels: identical for Identity, AutoContrast,
  Brightness, Sharpness, TranslateX/Y; max 1 level for ShearX/Y and Rotate (bilinear rounding);
  Equalize is checked against OpenCV's table (what DALI implements), and its distance to BLIP's
  PIL table is bounded (measured max 17, mean 4.4 levels).
"""

import io
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from blip_fast.data import dali_pipeline
from blip_fast.data.dali_pipeline import (
    HAS_DALI,
    DaliOptions,
    DaliTransformLoader,
    PilTransformLoader,
    make_transform_pipeline,
)
from blip_fast.data.synthetic import photo_like_jpeg
from blip_fast.data.transforms import (
    GEOMETRIC_AUGMENTS,
    MEAN,
    RATIO,
    STD,
    AugmentOp,
    TransformConfig,
    apply_augment_op,
    augment_magnitude,
)

needs_dali = pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali is not importable (pip install nvidia-dali-cuda130)")
LEVEL = 1.0 / (255.0 * min(STD))          # one pixel level in normalised units (the largest of the three)
SIZES = [(640, 480), (480, 640), (333, 217), (1000, 750), (384, 384)]



@pytest.fixture(scope="module")
def jpeg_files(tmp_path_factory):
    """Real JPEG files on disk (4:2:0 photos of several shapes, one 4:4:4, one grayscale), read back as bytes."""
    folder = tmp_path_factory.mktemp("jpegs")
    blobs = [photo_like_jpeg(i, w, h) for i, (w, h) in enumerate(SIZES)]
    blobs += [photo_like_jpeg(10, 500, 375, subsampling=0), photo_like_jpeg(11, 320, 240, mode="L")]
    paths = []
    for i, blob in enumerate(blobs):
        path = folder / f"{i:03d}.jpg"
        path.write_bytes(blob)
        paths.append(path)
    return [path.read_bytes() for path in paths]


def run_loader(loader):
    images, indices = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(indices)


def cpu_options(**overrides):
    return DaliOptions(**{"batch_size": 8, "num_threads": 2, "device": "cpu", "seed": 0, **overrides})


# ---------------------------------------------------------------------------------------------
# Evaluation transform: DALI CPU vs the PIL fallback
# ---------------------------------------------------------------------------------------------

@needs_dali
def test_eval_dali_cpu_matches_pil_fallback(jpeg_files):
    config = TransformConfig.eval(384)
    batches = [(jpeg_files, list(range(len(jpeg_files))))]
    dali, indices = run_loader(DaliTransformLoader(config, batches, cpu_options()))
    pil, _ = run_loader(PilTransformLoader(config, batches))
    assert dali.shape == pil.shape == (len(jpeg_files), 3, 384, 384) and dali.dtype == torch.float32
    assert indices.tolist() == list(range(len(jpeg_files)))
    diff = (dali - pil).abs()
    per_image = [f"{d.max() / LEVEL:.2f}/{d.mean() / LEVEL:.3f}" for d in diff]
    print("\nDALI CPU vs PIL eval, levels max/mean per image:", per_image)
    assert diff.max() <= 3 * LEVEL and diff.mean() <= 0.5 * LEVEL, per_image

    # the tolerance catches real bugs: each of these is far outside it
    std, mean = torch.tensor(STD).view(3, 1, 1), torch.tensor(MEAN).view(3, 1, 1)
    pixels = pil * std + mean
    imagenet = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        3, 1, 1)
    for wrong in (pil.flip(-1), pil.flip(1), imagenet):
        assert (dali - wrong).abs().mean() > 10 * LEVEL

    # the same decoded pixels fed to DALI: the whole difference is the resampler's, none the decoder's
    decoded = [np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")) for blob in jpeg_files]
    from_pixels, _ = run_loader(DaliTransformLoader(config, [(decoded, list(range(len(decoded))))],
                                                    cpu_options(inputs="pixels")))
    assert (from_pixels - dali).abs().max() <= 1 * LEVEL


# ---------------------------------------------------------------------------------------------
# Training transforms
# ---------------------------------------------------------------------------------------------

def check_normalised(images: torch.Tensor):
    low = torch.tensor([(0 - m) / s for m, s in zip(MEAN, STD, strict=True)]).view(1, 3, 1, 1)
    high = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD, strict=True)]).view(1, 3, 1, 1)
    x = images.float()
    assert torch.isfinite(x).all()
    assert ((x >= low - 0.02) & (x <= high + 0.02)).all()
    assert (x.flatten(1).std(1) > 0.1).all()                       # photos, not flat or zeroed


@needs_dali
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_pretrain_pipeline_shape_dtype_range(jpeg_files, dtype):
    config = TransformConfig.pretrain(224, dtype=dtype)
    batches = [(jpeg_files[:4], [10, 11, 12, 13]), (jpeg_files[4:], list(range(14, 14 + len(jpeg_files) - 4)))]
    images, indices = run_loader(DaliTransformLoader(config, batches, cpu_options(batch_size=4)))
    assert images.shape == (len(jpeg_files), 3, 224, 224) and images.dtype == config.torch_dtype
    assert images.is_contiguous() and indices.tolist() == list(range(10, 10 + len(jpeg_files)))
    check_normalised(images)


@needs_dali
def test_finetune_pipeline_from_pixels(jpeg_files):
    config = TransformConfig.finetune(96)
    decoded = [np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")) for blob in jpeg_files]
    images, _ = run_loader(DaliTransformLoader(config, [(decoded, list(range(len(decoded))))],
                                               cpu_options(inputs="pixels")))
    assert images.shape == (len(decoded), 3, 96, 96)
    check_normalised(images)


@needs_dali
def test_pretrain_pipeline_is_reproducible(jpeg_files):
    config = TransformConfig.pretrain(64)
    batches = [(jpeg_files, list(range(len(jpeg_files))))]
    first, _ = run_loader(DaliTransformLoader(config, batches, cpu_options(seed=7)))
    again, _ = run_loader(DaliTransformLoader(config, batches, cpu_options(seed=7, num_threads=1)))
    other, _ = run_loader(DaliTransformLoader(config, batches, cpu_options(seed=8)))
    assert torch.equal(first, again)
    assert (first - other).abs().flatten(1).amax(1).min() > 0.1   # every image drew other parameters


@needs_dali
@pytest.mark.parametrize("shape, scale", [((480, 640), (0.2, 1.0)), ((640, 480), (0.5, 1.0)), ((300, 300), (0.2, 1.0))])
def test_dali_crop_windows_stay_in_range(shape, scale):
    """The window generator behind ``decoders.image_random_crop`` (exposed as ``random_crop_generator``):
    area fraction in ``scale``, aspect ratio in (3/4, 4/3) up to rounding, log-uniform, inside the image."""
    from nvidia.dali import fn, pipeline_def, types

    batch = 2000

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=3)
    def pipeline():
        shapes = fn.external_source(source=lambda: [np.array(shape, np.int64)] * batch, dtype=types.INT64, ndim=1)
        anchor, window = fn.random_crop_generator(shapes, random_area=scale, random_aspect_ratio=RATIO, num_attempts=10)
        return anchor, window

    pipe = pipeline()
    pipe.build()
    anchors, windows = (np.stack([np.asarray(x) for x in out]) for out in pipe.run())
    h, w = windows[:, 0].astype(float), windows[:, 1].astype(float)
    assert ((anchors >= 0) & (anchors + windows <= np.array(shape))).all()
    assert ((w - 0.5) * (h - 0.5) <= scale[1] * shape[0] * shape[1]).all()
    assert ((w + 0.5) * (h + 0.5) >= scale[0] * shape[0] * shape[1]).all()
    assert ((w / h >= 3 / 4 - 1e-6) & (w / h <= 4 / 3 + 1e-6)).all()
    fractions, log_ratios = w * h / (shape[0] * shape[1]), np.log(w / h)
    assert fractions.min() < scale[0] + 0.05 and fractions.max() > 0.95
    assert log_ratios.min() < math.log(3 / 4) + 0.05 and log_ratios.max() > math.log(4 / 3) - 0.05
    if shape[0] == shape[1]:
        assert abs(log_ratios.mean()) < 0.03


def augment_only(config: TransformConfig, pixels: list[np.ndarray], seed: int = 5, batches: int = 1):
    """RandomAugment of ``config`` alone, in a DALI CPU pipeline, on the given uint8 HWC images."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(pixels), num_threads=1, device_id=None, seed=seed, enable_conditionals=True)
    def pipeline():
        images = fn.external_source(source=lambda: pixels, layout="HWC", dtype=types.UINT8, ndim=3)
        return dali_pipeline.random_augment(images, config, "cpu")

    pipe = pipeline()
    pipe.build()
    return [np.asarray(sample) for _ in range(batches) for sample in pipe.run()[0]]


def opencv_equalize(pixels: np.ndarray) -> np.ndarray:
    """cv2.equalizeHist per channel: lut = round((cdf - cdf_min) * 255 / (total - cdf_min))."""
    out = np.empty_like(pixels)
    for c in range(3):
        cdf = np.cumsum(np.bincount(pixels[..., c].ravel(), minlength=256))
        first = cdf[np.nonzero(cdf)[0][0]]
        lut = np.arange(256) if first == cdf[-1] else np.rint((cdf - first) * 255.0 / (cdf[-1] - first))
        out[..., c] = lut.clip(0, 255).astype(np.uint8)[pixels[..., c]]
    return out


@needs_dali
@pytest.mark.parametrize("op, m", [("Identity", 5.0), ("AutoContrast", 5.0), ("Equalize", 5.0), ("ShearX", 5.0),
                                   ("ShearY", 5.0), ("TranslateX", 5.0), ("TranslateY", 5.0), ("Rotate", 5.0),
                                   ("Brightness", 3.0), ("Sharpness", 3.0), ("Sharpness", 8.0)])
def test_augment_ops_match_pil_on_same_pixels(jpeg_files, op, m):
    size = 96
    pixels = [np.asarray(Image.open(io.BytesIO(blob)).convert("RGB").resize((size, size), Image.BICUBIC))
              for blob in jpeg_files[:5]]
    pixels.append((pixels[0] // 3 + 70).astype(np.uint8))            # low contrast
    config = TransformConfig.finetune(size, augment_ops=(op,), augment_n=1, augment_prob=1.0, augment_m=m)
    arg = augment_magnitude(op, m)
    candidates = [AugmentOp(op, arg)] + ([AugmentOp(op, -arg)] if op in GEOMETRIC_AUGMENTS else [])
    for out, source in zip(augment_only(config, pixels), pixels, strict=True):
        # DALI drew the sign itself: compare with the closer of the two
        diffs = [np.abs(out.astype(int) - apply_augment_op(source, c).astype(int)) for c in candidates]
        diff = min(diffs, key=np.mean)
        if op == "Equalize":
            assert np.abs(out.astype(int) - opencv_equalize(source).astype(int)).max() <= 1
            assert diff.mean() <= 8                                   # OpenCV's table vs BLIP's (PIL's)
        else:
            assert diff.max() <= 1, f"{op}(M={m}): max {diff.max()} levels"


@needs_dali
def test_randaugment_rates_in_dali():
    """N=2 slots, each an op drawn from the 10 and applied with p=0.5: at M=5 Identity, Brightness and
    Sharpness change nothing, so an image comes out unchanged with probability (0.5 + 0.5 * 0.3)^2."""
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(256)]
    out = augment_only(TransformConfig.finetune(16), pixels, batches=4)
    unchanged = np.mean([np.array_equal(o, p) for o, p in zip(out, pixels * 4, strict=True)])
    assert abs(unchanged - 0.65 ** 2) < 0.05                        # 3 sigma over 1024 samples


# ---------------------------------------------------------------------------------------------
# Backend switch and the PIL loader
# ---------------------------------------------------------------------------------------------

def test_falls_back_to_pil_without_dali(monkeypatch, caplog, jpeg_files):
    monkeypatch.setattr(dali_pipeline, "HAS_DALI", False)
    config = TransformConfig.eval(32)
    batches = [(jpeg_files[:2], [0, 1])]
    with caplog.at_level(logging.WARNING, logger="blip_fast.data"):
        loader = make_transform_pipeline(config, batches, backend="dali")
    assert isinstance(loader, PilTransformLoader) and "DALI is not installed" in caplog.text
    images, indices = run_loader(loader)
    assert images.shape == (2, 3, 32, 32) and indices.tolist() == [0, 1]
    with pytest.raises(RuntimeError, match="not installed"):
        dali_pipeline.build_dali_pipeline(config, batches)
    assert isinstance(make_transform_pipeline(config, batches, backend="pil"), PilTransformLoader)
    with pytest.raises(ValueError):
        make_transform_pipeline(config, batches, backend="torchvision")


def test_pil_loader_does_not_depend_on_worker_count(jpeg_files):
    config = TransformConfig.pretrain(48)
    batches = [(jpeg_files[i:i + 2], [i, i + 1]) for i in range(0, 6, 2)]
    serial, serial_indices = run_loader(PilTransformLoader(config, batches, seed=3))
    pooled, pooled_indices = run_loader(PilTransformLoader(config, batches, num_workers=2, seed=3))
    assert torch.equal(serial, pooled) and serial_indices.tolist() == pooled_indices.tolist() == list(range(6))
    check_normalised(serial)


# ---------------------------------------------------------------------------------------------
# GPU: the mixed (nvJPEG / hardware) decoder
# ---------------------------------------------------------------------------------------------

@needs_dali
@pytest.mark.gpu
def test_eval_dali_gpu_matches_pil_fallback(jpeg_files):
    config = TransformConfig.eval(384)
    batches = [(jpeg_files, list(range(len(jpeg_files))))]
    dali, _ = run_loader(DaliTransformLoader(config, batches, DaliOptions(batch_size=8, device="gpu", seed=0)))
    pil, _ = run_loader(PilTransformLoader(config, batches))
    assert dali.is_cuda and dali.shape == pil.shape
    diff = (dali.cpu() - pil).abs()
    print("\nDALI GPU vs PIL eval, levels max/mean:", f"{diff.max() / LEVEL:.2f}/{diff.mean() / LEVEL:.3f}")
    # nvJPEG's IDCT differs from libjpeg-turbo's by a level or two on top of the resampler
    assert diff.max() <= 6 * LEVEL and diff.mean() <= 0.75 * LEVEL


@needs_dali
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pretrain_pipeline_on_gpu(jpeg_files, dtype):
    config = TransformConfig.pretrain(224, dtype=dtype)
    batches = [(jpeg_files, list(range(len(jpeg_files))))]
    options = DaliOptions(batch_size=8, device="gpu", seed=1, hw_decoder_load=1.0)
    first, indices = run_loader(DaliTransformLoader(config, batches, options))
    again, _ = run_loader(DaliTransformLoader(config, batches, options))
    assert first.is_cuda and first.dtype == config.torch_dtype and first.shape == (len(jpeg_files), 3, 224, 224)
    assert torch.equal(first, again) and indices.tolist() == list(range(len(jpeg_files)))
    check_normalised(first.cpu())
