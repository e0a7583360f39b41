"""BLIP's image transforms in PIL + numpy + torch: the training augmentation and the evaluation resize.

The original (``data/__init__.py`` of salesforce/BLIP, ``create_dataset``) builds, with torchvision:

* training -- ``RandomResizedCrop(S, scale=(min_scale, 1.0), interpolation=BICUBIC)``,
  ``RandomHorizontalFlip()``, ``RandomAugment(2, 5, isPIL=True, augs=[...10 ops...])``,
  ``ToTensor()``, ``Normalize(MEAN, STD)``. ``min_scale`` is 0.2 for pretraining
  (``pretrain.py`` calls ``create_dataset('pretrain', config, min_scale=0.2)``) and the default 0.5
  for every fine-tuning task. LAVIS's ``blip_image_train`` processor is the same with a
  ``max_scale`` option (kept here as :attr:`TransformConfig.max_scale`).
* evaluation -- ``Resize((S, S), interpolation=BICUBIC)``, ``ToTensor()``, ``Normalize``
  (:func:`eval_transform`; inference, :func:`blip_fast.images.to_batch`, calls it too).

``Normalize`` uses the CLIP mean/std (:data:`MEAN`, :data:`STD`), as every BLIP transform does.

``RandomAugment`` (``transform/randaugment.py``) draws ``N`` op names uniformly *with replacement*
(``np.random.choice(augs, N)``); each is applied with probability 0.5; its argument follows from the
magnitude ``M`` of ``MAX_LEVEL = 10``:

==============  =====================================  ===============
op              argument                               at M = 5
==============  =====================================  ===============
Brightness      factor ``M/10 * 1.8 + 0.1``            1.0 (identity)
Sharpness       factor ``M/10 * 1.8 + 0.1``            1.0 (identity)
ShearX/ShearY   ``M/10 * 0.3``, random sign            +-0.15
TranslateX/Y    ``M/10 * 10`` pixels, random sign      +-5 px
Rotate          ``M/10 * 30`` degrees, random sign     +-15 degrees
==============  =====================================  ===============

(``translate_const = 10`` in the original: translations are absolute pixels, not a fraction of
the image.) The original works on numpy arrays with OpenCV; this module follows its formulas:
AutoContrast and Equalize build the same lookup tables, Brightness truncates like its table, and
the geometric ops use the same affine maps (``cv2.warpAffine``, bilinear, grey fill 128, pixel
centres at integer coordinates, rotation about ``(W/2, H/2)``), evaluated with PIL's bilinear
``Image.transform`` after moving them to PIL's pixel-corner coordinates (and framing the image with
fill pixels, so that samples next to the border blend with the fill as OpenCV's do). What remains is
rounding -- OpenCV's bilinear weights are multiples of 1/32 -- at most one level of 255.

Randomness comes from one ``numpy.random.Generator`` per call (a ``random.Random`` or an int seed
is accepted too), never from the global generators, so a transform is reproducible and DataLoader
workers do not repeat each other. Parameters are drawn first (:func:`sample_train_params`) and
applied second (:func:`apply_train_params`), so tests can check the drawn values.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFilter

from ..config import ConfigError

MEAN = (0.48145466, 0.4578275, 0.40821073)    # CLIP's, per RGB channel, on [0, 1] pixels
STD = (0.26862954, 0.26130258, 0.27577711)
KINDS = ("pretrain", "finetune", "eval")
DEFAULT_MIN_SCALE = {"pretrain": 0.2, "finetune": 0.5, "eval": 0.5}
RATIO = (3.0 / 4.0, 4.0 / 3.0)          # torchvision RandomResizedCrop's default aspect-ratio range
CROP_ATTEMPTS = 10                      # ... and its number of tries before the centre-crop fallback

BLIP_AUGMENTS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
                 "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
GEOMETRIC_AUGMENTS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
MAX_LEVEL = 10.0                        # randaugment.py: MAX_LEVEL
TRANSLATE_CONST = 10.0                  # randaugment.py: translate_const (pixels at M = MAX_LEVEL)
FILL = (128, 128, 128)                  # randaugment.py: replace_value
_WARP_PAD = 2
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TransformConfig:
    """Which of BLIP's image transforms to build, and its parameters (defaults: the original's)."""

    image_size: int = 384
    """Side of the square output in pixels (224 for pretraining, 384 for most fine-tuning)."""
    kind: str = "finetune"
    """``pretrain`` | ``finetune`` (random crop, flip, RandomAugment) | ``eval`` (resize only)."""
    min_scale: float | None = None
    """Smallest crop area as a fraction of the image; ``None``: 0.2 for pretrain, 0.5 for finetune."""
    max_scale: float = 1.0
    """Largest crop area fraction (1.0 in the original; LAVIS exposes it)."""
    randaugment: bool = True
    """Apply RandomAugment after the flip (training kinds only)."""
    augment_n: int = 2
    """Ops drawn per image (with replacement)."""
    augment_m: float = 5.0
    """Magnitude out of ``MAX_LEVEL`` = 10."""
    augment_prob: float = 0.5
    """Probability that each drawn op is applied."""
    augment_ops: tuple[str, ...] = BLIP_AUGMENTS
    """The op list to draw from; a subset of :data:`BLIP_AUGMENTS` (BLIP uses all ten)."""
    dtype: str = "float32"
    """Output dtype: ``float32`` | ``float16`` | ``bfloat16``."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"transform.kind must be one of {KINDS}; got {self.kind!r}")
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise ConfigError(f"transform.image_size must be an int >= 8; got {self.image_size!r}")
        if self.min_scale is None:
            self.min_scale = DEFAULT_MIN_SCALE[self.kind]
        if not 0.0 < self.min_scale <= self.max_scale <= 1.0:
            raise ConfigError(f"transform scale range must satisfy 0 < min_scale <= max_scale <= 1; got "
                              f"({self.min_scale}, {self.max_scale})")
        if not isinstance(self.augment_n, int) or self.augment_n < 0:
            raise ConfigError(f"transform.augment_n must be an int >= 0; got {self.augment_n!r}")
        if not 0.0 <= self.augment_m <= MAX_LEVEL:
            raise ConfigError(f"transform.augment_m must be in [0, {MAX_LEVEL:g}]; got {self.augment_m}")
        if not 0.0 <= self.augment_prob <= 1.0:
            raise ConfigError(f"transform.augment_prob must be in [0, 1]; got {self.augment_prob}")
        self.augment_ops = tuple(self.augment_ops)
        unknown = [op for op in self.augment_ops if op not in BLIP_AUGMENTS]
        if unknown or not self.augment_ops:
            raise ConfigError(f"transform.augment_ops must be a non-empty subset of {BLIP_AUGMENTS}; got {unknown}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"transform.dtype must be one of {tuple(DTYPES)}; got {self.dtype!r}")

    @classmethod
    def pretrain(cls, image_size: int = 224, **overrides) -> TransformConfig:
        """The pretraining transform of ``pretrain.py`` (scale 0.2-1.0)."""
        return cls(image_size=image_size, kind="pretrain", **overrides)

    @classmethod
    def finetune(cls, image_size: int = 384, **overrides) -> TransformConfig:
        """``transform_train`` of the fine-tuning tasks (scale 0.5-1.0)."""
        return cls(image_size=image_size, kind="finetune", **overrides)

    @classmethod
    def eval(cls, image_size: int = 384, **overrides) -> TransformConfig:
        """``transform_test``: bicubic resize to a square, no crop."""
        return cls(image_size=image_size, kind="eval", **overrides)

    @property
    def train(self) -> bool:
        return self.kind != "eval"

    @property
    def scale(self) -> tuple[float, float]:
        return (self.min_scale, self.max_scale)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def active_augment_ops(self) -> tuple[str, ...]:
        """The op list RandomAugment draws from, or ``()`` when it is off."""
        return self.augment_ops if (self.train and self.randaugment and self.augment_n > 0) else ()


# ---------------------------------------------------------------------------------------------
# Random parameters
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CropBox:
    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class AugmentOp:
    """One RandomAugment op that was applied: its name and its (signed) argument, ``None`` if it has none."""

    name: str
    arg: float | None = None


@dataclass(frozen=True)
class TrainParams:
    """Everything random about one training transform."""

    crop: CropBox
    flip: bool
    drawn: tuple[str, ...] = ()
    """The ``N`` op names RandomAugment drew (applied or not)."""
    applied: tuple[AugmentOp, ...] = field(default=())
    """The drawn ops that passed their coin flip, in order, with their arguments."""


def as_generator(rng: np.random.Generator | random.Random | int | None) -> np.random.Generator:
    """A numpy Generator from a Generator (returned as is), a ``random.Random`` (seeds one), an int seed or None."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, random.Random):
        return np.random.default_rng(rng.getrandbits(64))
    return np.random.default_rng(rng)


def random_resized_crop_params(width: int, height: int, scale: tuple[float, float],
                               rng: np.random.Generator, ratio: tuple[float, float] = RATIO) -> CropBox:
    """torchvision's ``RandomResizedCrop.get_params``: area fraction uniform in ``scale``, aspect ratio
    log-uniform in ``ratio``, up to 10 tries; then a centre crop clamped to the ratio range."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return CropBox(top, left, h, w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


def augment_magnitude(name: str, m: float) -> float | None:
    """The unsigned argument of an op at magnitude ``m`` (``arg_dict`` of randaugment.py)."""
    level = m / MAX_LEVEL
    if name in ("Brightness", "Sharpness"):
        return level * 1.8 + 0.1
    if name in ("ShearX", "ShearY"):
        return level * 0.3
    if name in ("TranslateX", "TranslateY"):
        return level * TRANSLATE_CONST
    if name == "Rotate":
        return level * 30.0
    return None


def sample_augment_ops(config: TransformConfig,
                       rng: np.random.Generator) -> tuple[tuple[str, ...], tuple[AugmentOp, ...]]:
    """RandomAugment's draws: the ``N`` names, and the applied ones with their arguments (same draw order
    as the original: all names first, then per op a coin, then -- if applied -- its sign)."""
    ops = config.active_augment_ops
    if not ops:
        return (), ()
    drawn = tuple(ops[i] for i in rng.integers(0, len(ops), size=config.augment_n))
    applied = []
    for name in drawn:
        if rng.random() > config.augment_prob:
            continue
        arg = augment_magnitude(name, config.augment_m)
        if name in ("ShearX", "ShearY", "TranslateX", "TranslateY") and rng.random() > 0.5:
            arg = -arg
        elif name == "Rotate" and rng.random() < 0.5:
            arg = -arg
        applied.append(AugmentOp(name, arg))
    return drawn, tuple(applied)


def sample_train_params(config: TransformConfig, width: int, height: int, rng: np.random.Generator) -> TrainParams:
    """Draw the crop, the flip and the RandomAugment ops for one ``width`` x ``height`` image."""
    crop = random_resized_crop_params(width, height, config.scale, rng)
    flip = bool(rng.random() < 0.5)
    drawn, applied = sample_augment_ops(config, rng)
    return TrainParams(crop, flip, drawn, applied)


# ---------------------------------------------------------------------------------------------
# RandomAugment ops on uint8 HWC arrays
# ---------------------------------------------------------------------------------------------

def augment_matrix(name: str, arg: float, size: tuple[int, int]) -> np.ndarray:
    """The 2x3 source->destination affine map of a geometric op, in pixel-*corner* coordinates.

    Built as the original builds it for ``cv2.warpAffine`` (pixel centres at integer coordinates,
    ``size = (W, H)``, rotation via ``getRotationMatrix2D((W/2, H/2), degrees, 1)``, positive angles
    counter-clockwise on screen), then conjugated by the half-pixel shift ``p_corner = p_centre + 0.5``
    that PIL's ``Image.transform`` and DALI's ``warp_affine`` use.
    """
    w, h = size
    forward = np.eye(3)
    if name == "ShearX":
        forward[0, 1] = arg
    elif name == "ShearY":
        forward[1, 0] = arg
    elif name == "TranslateX":
        forward[0, 2] = -arg
    elif name == "TranslateY":
        forward[1, 2] = -arg
    elif name == "Rotate":
        cx, cy = w / 2.0, h / 2.0
        a, b = math.cos(math.radians(arg)), math.sin(math.radians(arg))
        forward[:2] = [[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]]
    else:
        raise ValueError(f"{name} is not a geometric op")
    shift, unshift = np.eye(3), np.eye(3)
    shift[:2, 2], unshift[:2, 2] = 0.5, -0.5
    return (shift @ forward @ unshift)[:2]


def _warp(pixels: np.ndarray, name: str, arg: float) -> np.ndarray:
    h, w = pixels.shape[:2]
    forward = np.vstack([augment_matrix(name, arg, (w, h)), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)[:2]                  # PIL wants destination -> source
    # OpenCV's BORDER_CONSTANT blends a sample next to the edge with the fill; PIL clamps the
    # neighbour instead. Reading from a copy framed by 2 fill pixels gives OpenCV's result.
    inverse[:, 2] += _WARP_PAD
    framed = np.pad(pixels, ((_WARP_PAD, _WARP_PAD), (_WARP_PAD, _WARP_PAD), (0, 0)), constant_values=FILL[0])
    image = Image.fromarray(framed).transform((w, h), Image.AFFINE, tuple(inverse.ravel()),
                                              resample=Image.BILINEAR, fillcolor=FILL)
    return np.asarray(image)


def _per_channel(pixels: np.ndarray, table_fn) -> np.ndarray:
    out = np.empty_like(pixels)
    for c in range(pixels.shape[2]):
        table = table_fn(pixels[..., c])
        out[..., c] = pixels[..., c] if table is None else table[pixels[..., c]]
    return out


def _autocontrast_table(channel: np.ndarray) -> np.ndarray | None:
    low, high = int(channel.min()), int(channel.max())
    if high <= low:
        return None
    scale = 255.0 / (high - low)
    table = np.arange(256) * scale - low * scale          # float64, as randaugment.py's autocontrast_func
    return table.clip(0, 255).astype(np.uint8)


def _equalize_table(channel: np.ndarray) -> np.ndarray | None:
    """PIL's ImageOps.equalize table (randaugment.py's equalize_func), not OpenCV's."""
    hist = np.bincount(channel.ravel(), minlength=256)
    step = int(hist[hist != 0][:-1].sum()) // 255
    if step == 0:
        return None
    shifted = np.concatenate([[step // 2], hist[:-1]])
    return (np.cumsum(shifted) // step).clip(0, 255).astype(np.uint8)


def _sharpness(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the 3x3 smoothing filter [[1,1,1],[1,5,1],[1,1,1]]/13 inside a 1-pixel border (kept)."""
    if factor == 1.0:
        return pixels
    smooth = Image.fromarray(pixels).filter(ImageFilter.Kernel((3, 3), (1, 1, 1, 1, 5, 1, 1, 1, 1), scale=13))
    degenerate = np.asarray(smooth, dtype=np.float32)[1:-1, 1:-1]
    out = pixels.astype(np.float32)
    # the original casts without clipping (factors > 1 can leave [0, 255]); clip, then truncate like it
    out[1:-1, 1:-1] = (degenerate + factor * (out[1:-1, 1:-1] - degenerate)).clip(0, 255)
    return out.astype(np.uint8)


def apply_augment_op(pixels: np.ndarray, op: AugmentOp) -> np.ndarray:
    """Apply one RandomAugment op to a uint8 (H, W, 3) array."""
    name, arg = op.name, op.arg
    if name == "Identity":
        return pixels
    if name == "AutoContrast":
        return _per_channel(pixels, _autocontrast_table)
    if name == "Equalize":
        return _per_channel(pixels, _equalize_table)
    if name == "Brightness":
        table = (np.arange(256, dtype=np.float32) * arg).clip(0, 255).astype(np.uint8)
        return table[pixels]
    if name == "Sharpness":
        return _sharpness(pixels, arg)
    if name in GEOMETRIC_AUGMENTS:
        return _warp(pixels, name, arg)
    raise ValueError(f"unknown RandomAugment op {name!r}")


# ---------------------------------------------------------------------------------------------
# The transforms
# ---------------------------------------------------------------------------------------------

def normalize(pixels: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``ToTensor`` + ``Normalize``: uint8 (H, W, 3) -> (3, H, W) ``(x / 255 - mean) / std`` (computed in fp32)."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels).astype(np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return ((tensor - mean) / std).to(dtype)


def apply_train_params(image: Image.Image, config: TransformConfig, params: TrainParams) -> torch.Tensor:
    """Crop + bicubic resize, flip, RandomAugment ops, normalise: (3, S, S) in ``config.dtype``."""
    crop = params.crop
    size = config.image_size
    # torchvision's resized_crop on PIL: crop, then resize (a resize with ``box=`` would read pixels
    # outside the box into the bicubic support and differ at the crop's edges)
    if image.mode != "RGB":
        image = image.convert("RGB")
    patch = image.crop((crop.left, crop.top, crop.left + crop.width, crop.top + crop.height))
    patch = patch.resize((size, size), Image.BICUBIC)
    if params.flip:
        patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = np.asarray(patch)
    for op in params.applied:
        pixels = apply_augment_op(pixels, op)
    return normalize(pixels, config.torch_dtype)


def train_transform(image: Image.Image, config: TransformConfig,
                    rng: np.random.Generator | random.Random | int | None = None) -> torch.Tensor:
    """BLIP's ``transform_train`` on one RGB image."""
    rng = as_generator(rng)
    params = sample_train_params(config, image.width, image.height, rng)
    return apply_train_params(image, config, params)


def eval_transform(image: Image.Image, config: TransformConfig) -> torch.Tensor:
    """BLIP's ``transform_test``: bicubic resize to (S, S), normalise; (3, S, S) in ``config.dtype``."""
    size = config.image_size
    resized = image.convert("RGB").resize((size, size), Image.BICUBIC)
    return normalize(np.asarray(resized), config.torch_dtype)


class PilTransform:
    """The transform a config names, as a callable ``(PIL image[, rng]) -> (3, S, S) tensor``.

    Without an ``rng`` argument it draws from its own generator. That generator is created lazily in
    each process: from ``seed`` and, inside a torch DataLoader worker, the worker id (so workers that
    share one instance do not draw the same parameters); from fresh OS entropy when ``seed`` is None.
    """

    def __init__(self, config: TransformConfig, seed: int | None = None):
        self.config = config
        self.seed = seed
        self._pid = None
        self._rng = None

    def _generator(self) -> np.random.Generator:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            worker = torch.utils.data.get_worker_info()
            entropy = None if self.seed is None else [self.seed, 0 if worker is None else worker.id + 1]
            self._rng = np.random.default_rng(entropy)
        return self._rng

    def __call__(self, image: Image.Image, rng=None) -> torch.Tensor:
        if not self.config.train:
            return eval_transform(image, self.config)
        return train_transform(image, self.config, self._generator() if rng is None else rng)
