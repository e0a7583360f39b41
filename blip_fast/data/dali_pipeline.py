"""BLIP's image transforms as an NVIDIA DALI pipeline (GPU or CPU), with the PIL transforms as fallback.

Batches of encoded JPEG bytes (or decoded uint8 HWC pixels) and their sample indices come in through
an ``external_source``, so any of the project's sample sources can feed it; normalised (B, 3, S, S)
tensors and the indices come out. The graph follows ``transform_train`` / ``transform_test`` of the
original (see :mod:`blip_fast.data.transforms` for the exact semantics):

training   ``decoders.image_random_crop`` (area in ``config.scale``, aspect ratio in (3/4, 4/3), 10
           tries; ``mixed`` = nvJPEG / the hardware JPEG engine, with region-of-interest decoding)
           -> ``resize`` to (S, S), bicubic with antialiasing -> ``flip`` (p = 0.5)
           -> RandomAugment with conditional execution (below) -> ``crop_mirror_normalize``
evaluation ``decoders.image`` -> ``resize`` to (S, S), bicubic -> ``crop_mirror_normalize``

RandomAugment: for each of the ``N`` slots, one op index drawn uniformly from the op list
(``random.choice``), a coin with ``augment_prob`` and a coin for the sign; ``if`` statements
(``enable_conditionals``) route each sample to at most one branch per slot:

* ShearX/ShearY/TranslateX/TranslateY/Rotate -> one ``warp_affine`` (bilinear, fill 128) whose per-sample
  matrix is selected arithmetically from the precomputed maps of
  :func:`~blip_fast.data.transforms.augment_matrix` (the same maps the PIL path uses);
* AutoContrast -> per-channel min/max (``reductions``) and the original's stretch, truncated;
* Equalize -> ``equalize``; Brightness -> multiply, truncated; Sharpness -> ``filter`` with the
  original's 3x3 kernel, blended inside a 1-pixel border.

At magnitude 5 Brightness and Sharpness have factor 1.0, which the original treats as the identity;
they get no branch then.

Where DALI differs from the PIL fallback (and from torchvision/OpenCV in the original):

* the crop window: DALI's generator (``operators/image/crop/random_crop_generator_util.cc``) draws
  like torchvision -- area uniform in ``scale``, aspect ratio log-uniform, 10 tries -- but also rejects
  a window whose *rounded* ratio leaves the range, and when every try fails (images wider than 4:3
  by far) it keeps its fallback window at a random place instead of the centre, ``int`` instead of
  ``round`` for its side (35x97: 35x46 against torchvision's 35x47);
* bicubic resampling: DALI's cubic filter against PIL's, at most 2 levels of 255 apart on the
  evaluation transform (measured on photo-like JPEGs; tests/data/test_dali_pipeline.py);
* Equalize: DALI's table is OpenCV's (cdf rescaled to 0..255); BLIP's is PIL's
  (``(cumsum(hist shifted by one) + step // 2) // step``), a few levels apart;
* warp/AutoContrast arithmetic runs in fp32 (the original: fp64 tables, OpenCV's 1/32 bilinear
  weights): at most one level apart;
* output ``bfloat16``: DALI has no bf16, so the pipeline writes fp32 and the tensor is cast after.

The CPU decoder (libjpeg-turbo) returns the same pixels as PIL. ``mixed`` decoding uses nvJPEG;
``jpeg_fancy_upsampling=True`` (default here) makes it upsample chroma like libjpeg-turbo.

Importing this module never needs DALI (:data:`HAS_DALI`); :func:`make_transform_pipeline` falls
back to the PIL transforms, with a logged message, when DALI is missing.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .transforms import (
    GEOMETRIC_AUGMENTS,
    MEAN,
    RATIO,
    STD,
    PilTransform,
    TransformConfig,
    augment_magnitude,
    augment_matrix,
)

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    HAS_DALI = True
except ImportError:  # DALI is optional: the PIL path needs none of it
    HAS_DALI = False

log = logging.getLogger("blip_fast.data")

BACKENDS = ("auto", "dali", "pil")
Batch = tuple[Sequence, Sequence[int]]
"""What a source yields: ``(images, indices)`` -- encoded image bytes (or uint8 HWC arrays when
``inputs="pixels"``) and one integer per image that comes back with its tensor (a sample id, a label)."""


@dataclass
class DaliOptions:
    """How to run the DALI pipeline (the transform itself is the :class:`TransformConfig`)."""

    batch_size: int = 256
    """Largest batch the source yields (smaller batches are fine)."""
    device: str = "auto"
    """``gpu`` (``mixed`` decoder, GPU operators), ``cpu`` (no GPU needed) or ``auto`` (gpu if CUDA is there)."""
    num_threads: int = 4
    """DALI CPU worker threads (decoding on ``cpu``; Huffman decoding and per-sample work on ``gpu``)."""
    prefetch_queue_depth: int = 2
    """Batches DALI prepares ahead of the consumer."""
    hw_decoder_load: float = 1.0
    """Share of JPEGs sent to the hardware decoder (A100/H100); DALI's default 0.65 gave 13,166
    images/s against 28,049 at 1.0 on an H100 (docs/benchmarks.md)."""
    jpeg_fancy_upsampling: bool = True
    """``mixed`` decoder: upsample chroma like libjpeg-turbo (what PIL and the CPU decoder do)."""
    device_id: int | None = None
    """CUDA device for ``gpu``; default: torch's current device."""
    seed: int | None = None
    """Seed of every random operator; the same seed and inputs give the same outputs."""
    inputs: str = "encoded"
    """``encoded`` (image file bytes, decoded in the pipeline) or ``pixels`` (decoded uint8 HWC RGB)."""

    def __post_init__(self):
        if self.device not in ("auto", "gpu", "cpu"):
            raise ValueError(f"device must be auto, gpu or cpu; got {self.device!r}")
        if self.inputs not in ("encoded", "pixels"):
            raise ValueError(f"inputs must be encoded or pixels; got {self.inputs!r}")
        if self.batch_size < 1 or self.num_threads < 1 or self.prefetch_queue_depth < 1:
            raise ValueError("batch_size, num_threads and prefetch_queue_depth must be >= 1")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be in [0, 1]; got {self.hw_decoder_load}")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "gpu" if torch.cuda.is_available() else "cpu"
        return self.device


class _Feed:
    """The external_source iterator: numpy batches from ``(images, indices)`` pairs."""

    def __init__(self, source: Iterable[Batch], inputs: str):
        self.batches = iter(source)
        self.inputs = inputs

    def __iter__(self):
        return self

    def __next__(self):
        images, indices = next(self.batches)
        if self.inputs == "encoded":
            arrays = [np.frombuffer(data, dtype=np.uint8) for data in images]
        else:
            arrays = [np.ascontiguousarray(pixels, dtype=np.uint8) for pixels in images]
        return arrays, np.asarray(indices, dtype=np.int64).reshape(-1)


# ---------------------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------------------

def _autocontrast(images):
    """randaugment.py's autocontrast_func: per channel (x - lo) * 255 / (hi - lo), truncated; flat channels kept."""
    low = fn.cast(fn.reductions.min(images, axes=(0, 1), keep_dims=True), dtype=types.FLOAT)
    high = fn.cast(fn.reductions.max(images, axes=(0, 1), keep_dims=True), dtype=types.FLOAT)
    stretch = fn.cast(high > low, dtype=types.FLOAT)
    gain = stretch * (255.0 / dmath.max(high - low, 1.0)) + (1.0 - stretch)
    out = (images - low * stretch) * gain
    return fn.cast(dmath.floor(dmath.clamp(out, 0.0, 255.0)), dtype=types.UINT8)


def _brightness(images, factor: float):
    return fn.cast(dmath.floor(dmath.clamp(images * factor, 0.0, 255.0)), dtype=types.UINT8)


def _sharpness(images, factor: float, size: int, device: str):
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0
    # the filter lives where the images do (DALI's own auto_aug does the same); the result is rounded
    # to uint8 first, like cv2.filter2D's output
    smooth = fn.filter(images, types.Constant(kernel, device=device), border="reflect_101", dtype=types.UINT8)
    smooth = fn.cast(smooth, dtype=types.FLOAT)
    pixels = fn.cast(images, dtype=types.FLOAT)
    blended = dmath.floor(dmath.clamp(smooth + factor * (pixels - smooth), 0.0, 255.0))
    interior = np.zeros((size, size, 1), dtype=np.float32)
    interior[1:-1, 1:-1] = 1.0                       # the original keeps the 1-pixel border unfiltered
    inside = types.Constant(interior, device=device)
    return fn.cast(pixels + inside * (blended - pixels), dtype=types.UINT8)


def _geometric_matrix(ops: tuple[str, ...], choice, negative, magnitude_m: float, size: int):
    """Per-sample 2x3 source->destination map (pixel corners) of the drawn geometric op, zeros otherwise."""
    matrix = None
    negative = fn.cast(negative, dtype=types.FLOAT)
    for index, name in enumerate(ops):
        if name not in GEOMETRIC_AUGMENTS:
            continue
        magnitude = augment_magnitude(name, magnitude_m)
        plus = types.Constant(augment_matrix(name, magnitude, (size, size)).astype(np.float32), device="cpu")
        minus = types.Constant(augment_matrix(name, -magnitude, (size, size)).astype(np.float32), device="cpu")
        term = fn.cast(choice == index, dtype=types.FLOAT) * (negative * minus + (1.0 - negative) * plus)
        matrix = term if matrix is None else matrix + term
    return matrix


def _any_of(choice, indices: list[int]):
    hit = None
    for index in indices:
        hit = (choice == index) if hit is None else (hit | (choice == index))
    return hit


def random_augment(images, config: TransformConfig, device: str):
    """RandomAugment(N, M) with one conditional branch per op kind and slot (see the module docstring)."""
    ops = config.active_augment_ops
    size = config.image_size
    brightness = augment_magnitude("Brightness", config.augment_m)
    sharpness = augment_magnitude("Sharpness", config.augment_m)
    kinds = {
        "geometric": [i for i, name in enumerate(ops) if name in GEOMETRIC_AUGMENTS],
        "AutoContrast": [i for i, name in enumerate(ops) if name == "AutoContrast"],
        "Equalize": [i for i, name in enumerate(ops) if name == "Equalize"],
        "Brightness": [i for i, name in enumerate(ops) if name == "Brightness" and brightness != 1.0],
        "Sharpness": [i for i, name in enumerate(ops) if name == "Sharpness" and sharpness != 1.0],
    }
    for _ in range(config.augment_n):
        choice = fn.random.choice(len(ops))
        applied = fn.random.coin_flip(probability=config.augment_prob) == 1
        negative = fn.random.coin_flip(probability=0.5)
        if kinds["geometric"]:
            matrix = _geometric_matrix(ops, choice, negative, config.augment_m, size)
            if applied & _any_of(choice, kinds["geometric"]):
                images = fn.warp_affine(images, matrix=matrix, fill_value=128.0, interp_type=types.INTERP_LINEAR,
                                        inverse_map=False)
        if kinds["AutoContrast"]:
            if applied & _any_of(choice, kinds["AutoContrast"]):
                images = _autocontrast(images)
        if kinds["Equalize"]:
            if applied & _any_of(choice, kinds["Equalize"]):
                images = fn.equalize(images)
        if kinds["Brightness"]:
            if applied & _any_of(choice, kinds["Brightness"]):
                images = _brightness(images, brightness)
        if kinds["Sharpness"]:
            if applied & _any_of(choice, kinds["Sharpness"]):
                images = _sharpness(images, sharpness, size, device)
    return images


def _transform_graph(config: TransformConfig, feed: _Feed, options: DaliOptions, device: str):
    inputs, indices = fn.external_source(
        source=feed, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT64],
        ndim=[1 if options.inputs == "encoded" else 3, 0], layout=["" if options.inputs == "encoded" else "HWC", ""])
    size = config.image_size
    decode = {"device": "mixed" if device == "gpu" else "cpu", "output_type": types.RGB}
    if device == "gpu":
        decode.update(hw_decoder_load=options.hw_decoder_load, jpeg_fancy_upsampling=options.jpeg_fancy_upsampling)
    resize = {"interp_type": types.INTERP_CUBIC, "antialias": True}
    if options.inputs == "pixels" and device == "gpu":
        inputs = inputs.gpu()
    if not config.train:
        images = fn.decoders.image(inputs, **decode) if options.inputs == "encoded" else inputs
        images = fn.resize(images, size=(size, size), mode="stretch", **resize)
    elif options.inputs == "encoded":
        images = fn.decoders.image_random_crop(inputs, random_area=config.scale, random_aspect_ratio=RATIO,
                                               num_attempts=10, **decode)
        images = fn.resize(images, size=(size, size), mode="stretch", **resize)
    else:
        images = fn.random_resized_crop(inputs, size=(size, size), random_area=config.scale,
                                        random_aspect_ratio=RATIO, num_attempts=10, **resize)
    mirror = 0
    if config.train:
        flip = fn.random.coin_flip(probability=0.5)
        if config.active_augment_ops:
            # the flip must come before RandomAugment: ShearY and Rotate do not commute with it
            images = random_augment(fn.flip(images, horizontal=flip), config, device)
        else:
            mirror = flip
    out = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT16 if config.dtype == "float16" else types.FLOAT, output_layout="CHW",
        mean=[255.0 * m for m in MEAN], std=[255.0 * s for s in STD], mirror=mirror)
    return out, indices


if HAS_DALI:
    _transform_pipeline = pipeline_def(_transform_graph, enable_conditionals=True)


def build_dali_pipeline(config: TransformConfig, source: Iterable[Batch], options: DaliOptions | None = None, *,
                        checkpointing: bool = False, checkpoint: bytes | None = None):
    """The built ``nvidia.dali.Pipeline`` for ``config``, pulling batches from ``source``.

    Each ``run()`` returns ``(images, indices)``: a dense (B, 3, S, S) TensorList (fp16 when
    ``config.dtype == "float16"``, else fp32) and the (B,) int64 indices; it raises ``StopIteration``
    after the source's last batch. With ``checkpointing`` the pipeline records its random state
    (``pipe.checkpoint()``) and starts from ``checkpoint`` when one is given.
    """
    if not HAS_DALI:
        raise RuntimeError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    options = options or DaliOptions()
    device = options.resolved_device()
    device_id = None
    if device == "gpu":
        device_id = options.device_id if options.device_id is not None else torch.cuda.current_device()
    extra = {"enable_checkpointing": True, "checkpoint": checkpoint} if checkpointing else {}
    with warnings.catch_warnings():
        # DALI warns that it cannot record where an iterator source is; the caller's loader state records that
        warnings.filterwarnings("ignore", message="Checkpointing enabled in a pipeline with external source")
        pipe = _transform_pipeline(config, _Feed(source, options.inputs), options, device,
                                   batch_size=options.batch_size, num_threads=options.num_threads,
                                   device_id=device_id, seed=options.seed,
                                   prefetch_queue_depth=options.prefetch_queue_depth, **extra)
        pipe.build()
    return pipe


# ---------------------------------------------------------------------------------------------
# Loaders: iterate (images, indices) torch batches
# ---------------------------------------------------------------------------------------------

class DaliTransformLoader:
    """Iterates ``(images, indices)``: (B, 3, S, S) tensors in ``config.dtype`` (on the GPU for ``gpu``)."""

    backend = "dali"

    def __init__(self, config: TransformConfig, source: Iterable[Batch], options: DaliOptions | None = None, *,
                 checkpointing: bool = False, checkpoint: bytes | None = None):
        self.config = config
        self.options = options or DaliOptions()
        self.device = self.options.resolved_device()
        self.pipe = build_dali_pipeline(config, source, self.options, checkpointing=checkpointing,
                                        checkpoint=checkpoint)

    def checkpoint(self) -> bytes:
        """The random state as of the last batch taken out of the pipeline (not the ones prefetched); needs
        ``checkpointing=True``."""
        return self.pipe.checkpoint()

    def _to_torch(self, images) -> torch.Tensor:
        if self.device == "cpu":
            tensor = torch.from_numpy(images.as_array())          # as_array copies out of DALI's buffer
        else:
            from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

            dense = images.as_tensor()
            tensor = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype],
                                 device=torch.device("cuda", self.pipe.device_id))
            # copy on torch's current stream, ordered after DALI's work on its own stream
            feed_ndarray(dense, tensor, cuda_stream=torch.cuda.current_stream(tensor.device))
        return tensor.to(self.config.torch_dtype)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            try:
                images, indices = self.pipe.run()
            except StopIteration:
                return
            yield self._to_torch(images), torch.from_numpy(indices.as_array()).reshape(-1)


def _decode(data, inputs: str) -> Image.Image:
    if inputs == "pixels":
        return Image.fromarray(np.asarray(data, dtype=np.uint8))
    from .decode import decode_image

    return decode_image(data)


def _pil_batch(job) -> tuple[torch.Tensor, torch.Tensor]:
    config, inputs, seed, number, (images, indices) = job
    transform = PilTransform(config)
    rng = np.random.default_rng(None if seed is None else [seed, number])
    tensors = [transform(_decode(data, inputs), rng) for data in images]
    return torch.stack(tensors), torch.as_tensor(np.asarray(indices, dtype=np.int64)).reshape(-1)


def _pil_worker_init():
    # one intra-op thread per worker, as torch's DataLoader workers do: N processes already use N cores,
    # and a forked child must not use the OpenMP pool it inherited from its parent
    torch.set_num_threads(1)


class PilTransformLoader:
    """The PIL fallback with the loader interface of :class:`DaliTransformLoader` (tensors on the CPU).

    ``num_workers`` processes transform whole batches, at most ``prefetch`` batches each ahead of the
    consumer. Batch ``k`` draws from ``numpy.random.default_rng([seed, k])``, so the result does not
    depend on ``num_workers``.
    """

    backend = "pil"

    def __init__(self, config: TransformConfig, source: Iterable[Batch], num_workers: int = 0,
                 seed: int | None = None, inputs: str = "encoded", prefetch: int = 2):
        self.config = config
        self.source = source
        self.num_workers = num_workers
        self.seed = seed
        self.inputs = inputs
        self.prefetch = prefetch

    def _jobs(self):
        for number, batch in enumerate(self.source):
            yield self.config, self.inputs, self.seed, number, batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        jobs = self._jobs()
        if self.num_workers == 0:
            yield from map(_pil_batch, jobs)
            return
        # torch's multiprocessing context moves the result tensors through shared memory, not the pipe
        context = torch.multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                                    else "spawn")
        with context.Pool(self.num_workers, initializer=_pil_worker_init) as pool:
            pending = deque(pool.apply_async(_pil_batch, (job,))
                            for job in itertools.islice(jobs, self.num_workers * self.prefetch))
            while pending:
                result = pending.popleft().get()
                job = next(jobs, None)
                if job is not None:
                    pending.append(pool.apply_async(_pil_batch, (job,)))
                yield result


def make_transform_pipeline(config: TransformConfig, source: Iterable[Batch], backend: str = "auto",
                            options: DaliOptions | None = None, num_workers: int = 0):
    """A loader of transformed batches from ``source``: DALI when asked for (or ``auto``) and installed, else PIL.

    ``options`` configures DALI (its ``seed`` and ``inputs`` also apply to the PIL fallback);
    ``num_workers`` is the PIL fallback's process count.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    options = options or DaliOptions()
    if backend in ("auto", "dali"):
        if HAS_DALI:
            log.info("image transforms: DALI on %s", options.resolved_device())
            return DaliTransformLoader(config, source, options)
        log.warning("image transforms: NVIDIA DALI is not installed; using the PIL fallback (%d workers)", num_workers)
    return PilTransformLoader(config, source, num_workers=num_workers, seed=options.seed, inputs=options.inputs)
