"""Resumable training batches (:class:`ResumableBatches`), and those of image-caption pairs (:class:`CaptionBatches`).

:class:`ResumableBatches` is what every task's training batches share: a source read by a
:class:`~blip_fast.data.stream.SampleStream` whose transform prepares each sample (a
:class:`SamplePrepare`, in the DataLoader workers), batched by a
:class:`~blip_fast.data.loader.ResumableLoader` with the task's collate function, with ``set_epoch``,
``state_dict`` / ``load_state_dict`` as of the last batch handed out, and ``stats``.
:class:`CaptionBatches` is the caption task's (pretraining, retrieval and caption fine-tuning);
:mod:`blip_fast.data.task_batches` has VQA's and NLVR2's.

    source = open_caption_source("shards", "data/cc3m/{00000..00331}.tar")
    batches = CaptionBatches(source, TransformConfig.pretrain(224), batch_size=64, num_workers=8)
    batches.load_state_dict(checkpoint["data"])              # when resuming
    for epoch in range(batches.epoch, epochs):
        for batch in batches:                                  # the rest of this epoch
            batch = batch.to("cuda", non_blocking=True)
            ...
            checkpoint["data"] = batches.state_dict()          # as of the batch just handed out

Each sample goes through what BLIP's ``pretrain_dataset`` / ``coco_karpathy_train.__getitem__`` do:
a caption list gets one caption by random choice, the caption is cleaned with ``pre_caption``
(:func:`~blip_fast.text.clean.clean_caption`, ``max_words``) and the image transformed; the batch's
captions are tokenized as ``blip_pretrain`` does (``padding="longest"``, truncated at ``max_length``),
so ``input_ids`` is as long as the longest caption *of the batch*. A caption that is empty after
cleaning is skipped and counted (``no_caption``) like every other bad sample (see
:mod:`blip_fast.data.sample`).

Where the work happens, by backend:

* ``pil`` -- the DataLoader workers decode, choose the caption, transform the image with
  :class:`~blip_fast.data.transforms.PilTransform` and tokenize; the main process only passes
  batches on.
* ``dali`` -- the workers read the image bytes, check them, choose the caption and tokenize; the
  main process feeds the bytes to the DALI pipeline of :mod:`blip_fast.data.dali_pipeline` (GPU
  decoding with ``DaliOptions(device="gpu")``, images then stay on the GPU). DALI refuses a JPEG
  cut short (even one that only lacks its end marker) and any GIF, and one refused file stops
  the whole pipeline, so the workers hand it only JPEGs that end in their end marker (one that
  lacks only the marker gets it back, as :func:`~blip_fast.data.decode.decode_image` does) and
  re-encode every other format, decoded with PIL, as BMP. JPEG data damaged *inside* the file
  decodes with a warning, as with PIL.

Randomness, and why resuming is exact. The sample order is the
:class:`~blip_fast.data.stream.SampleStream`'s, a function of ``(seed, epoch, rank, world_size,
num_workers)``. The caption choice and the PIL transform draw from generators seeded with ``(seed,
epoch, sample key)``: a sample gets the same caption and the same crop whatever the worker count,
and differs from one epoch to the next. DALI's random operators cannot be seeded per sample; the
pipeline is built each epoch with a seed drawn from ``(DaliOptions.seed, else seed; epoch, rank)``,
so its crops depend on the batch a sample lands in (and so on ``num_workers``). ``state_dict()``
holds the :class:`~blip_fast.data.loader.ResumableLoader` state *as of the last batch handed out*
-- DALI reads ``prefetch_queue_depth`` batches ahead, so the states of batches fed to DALI wait in
a queue until their images come out -- and, on DALI, the pipeline's own checkpoint (its random
number generators at that batch; ``enable_checkpointing``). A fresh ``CaptionBatches`` with the
same settings that loads it continues with exactly the batches the uninterrupted one would have
given: the same keys, captions and tokens, the same PIL images bit for bit, and on DALI the same
random crops and augmentations (checked on ``cpu``; the checkpoint needs the same DALI version and
device kind). A state saved on another backend resumes the same samples and captions with fresh
random augmentation, and says so in the log.
"""

from __future__ import annotations

import abc
import base64
import binascii
import dataclasses
import hashlib
import io
import logging
import os
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..text.clean import clean_caption
from ..text.tokenizer import BlipTokenizer
from .annotations import CaptionAnnotations, NlvrAnnotations, VqaAnnotations
from .dali_pipeline import HAS_DALI, DaliOptions, DaliTransformLoader
from .decode import JPEG_END_MISSING, decode_image, has_words
from .jpeg import jpeg_frame_kind, jpeg_scan_complete
from .loader import ResumableLoader
from .sample import CORRUPT_IMAGE, NO_CAPTION, BadSample, DataStats, Sample
from .shards import TarShards
from .stream import SampleStream
from .transforms import PilTransform, TransformConfig

if TYPE_CHECKING:
    from ..models.packing import PackedText

log = logging.getLogger("blip_fast.data")

BACKENDS = ("pil", "dali", "auto")
SOURCE_KINDS = ("json", "shards")
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
DALI_JPEG_FRAMES = (0xC0, 0xC1, 0xC2)  # Huffman baseline, extended sequential, progressive
_CAPTION_DRAW, _IMAGE_DRAW = 0, 1      # the last seed word: which of a sample's two generators


def pinned(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` in page-locked host memory, from which a copy to the GPU with ``non_blocking=True`` runs beside the
    host (an ordinary one waits for it); tensors already on a device (DALI's GPU images) are left alone."""
    return tensor.pin_memory() if tensor is not None and tensor.device.type == "cpu" else tensor


@dataclass
class CaptionBatch:
    """One training batch: images and their tokenized captions, in the same order."""

    images: torch.Tensor
    """(B, 3, S, S) in ``TransformConfig.dtype``; on the GPU for DALI on ``gpu``, else on the CPU."""
    input_ids: torch.Tensor
    """(B, L) long, [CLS] first and [SEP] last, padded with 0; L is the longest caption of this batch."""
    attention_mask: torch.Tensor
    """(B, L) long, 1 on real tokens."""
    keys: list[str]
    """Sample keys (the shard key, or the entry index of a JSON list), for logging and de-duplication."""
    img_ids: torch.Tensor | None = None
    """(B,) long: the consecutive image id of a Karpathy training list (``coco_karpathy_train``'s third
    output, what retrieval fine-tuning treats as positives); None unless every sample has one."""
    packing: PackedText | None = None
    """Where the captions' real tokens go when packed (set by the trainer with ``train.pack_text``)."""

    def to(self, device, non_blocking: bool = False) -> CaptionBatch:
        def move(tensor):
            return None if tensor is None else tensor.to(device, non_blocking=non_blocking)

        return CaptionBatch(move(self.images), move(self.input_ids), move(self.attention_mask), self.keys,
                            move(self.img_ids), move(self.packing))

    def pin_memory(self) -> CaptionBatch:
        """The batch with its host tensors in page-locked memory (the DataLoader calls this with ``pin_memory``)."""
        return dataclasses.replace(self, images=pinned(self.images), input_ids=pinned(self.input_ids),
                                   attention_mask=pinned(self.attention_mask), img_ids=pinned(self.img_ids))

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class _Pair:
    """One prepared sample: the transformed image (PIL backend) or checked image bytes (DALI), its caption."""

    key: str
    image: torch.Tensor | bytes
    caption: str
    img_id: int | None


@dataclass
class _EncodedBatch:
    """What the workers hand the DALI backend: image bytes, tokenized captions."""

    images: list[bytes]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    keys: list[str]
    img_ids: torch.Tensor | None


def _key_word(key: str) -> int:
    """A 64-bit seed word from a sample key, the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def _dali_readable(data: bytes, stats: DataStats, what: str) -> bytes:
    """Image bytes DALI decodes without stopping (see the module docstring), or :class:`BadSample`."""
    # a JPEG (the stream has checked the header) of the frames DALI's decoders take: Huffman baseline, extended,
    # progressive. Lossless, hierarchical and arithmetic-coded ones stop DALI's pipeline: PIL decodes them below
    if data.startswith(_SOI) and jpeg_frame_kind(data) in DALI_JPEG_FRAMES:
        if data.endswith(_EOI):
            return data
        body = data.rstrip(b"\xff")                 # a cut between FF and D9 leaves a lone FF
        if jpeg_scan_complete(body):
            stats.fix(JPEG_END_MISSING)
            return body + _EOI
        raise BadSample(CORRUPT_IMAGE, f"{what}: JPEG cut short inside its image data")
    with Image.open(io.BytesIO(data)) as image:
        fmt = image.format
    out = io.BytesIO()
    decode_image(data, stats, what=what).save(out, "BMP")
    stats.fix(f"reencoded_{fmt}_for_dali")
    return out.getvalue()


class SamplePrepare(abc.ABC):
    """A :class:`~blip_fast.data.stream.SampleStream` transform that a task's batches run in the DataLoader workers:
    a checked sample (its image decoded, or read only, per ``decode``) -> what the task's collate function takes,
    or :class:`BadSample`.

    Its random choices draw from :meth:`rng`, generators of the sample's own, which is what makes them the same
    whatever the worker count and a resumed pass the same as the uninterrupted one. :class:`ResumableBatches` sets
    ``epoch`` before each pass and ``stream`` to the stream it runs in (whose live counters take the repairs made
    here, such as a second image's).
    """

    def __init__(self, seed: int):
        self.seed, self.epoch = seed, 0
        self.stream: SampleStream | None = None

    def rng(self, key: str, draw: int) -> np.random.Generator:
        """The generator of the sample ``key``'s draw number ``draw`` (one per random choice): a function of
        ``(seed, epoch, key, draw)`` only, so different each epoch."""
        return np.random.default_rng([self.seed, self.epoch, _key_word(key), draw])

    @abc.abstractmethod
    def __call__(self, sample: Sample):
        """The prepared sample."""


class _PrepareSample(SamplePrepare):
    """The caption task's preparation: choose and clean the caption, then transform the image (``transform``) or
    make its bytes safe for DALI (``transform=None``)."""

    def __init__(self, transform: PilTransform | None, max_words: int, seed: int):
        super().__init__(seed)
        self.transform, self.max_words = transform, max_words

    def __call__(self, sample: Sample) -> _Pair:
        caption = sample.caption
        if isinstance(caption, str):
            caption = [caption]
        if not isinstance(caption, list):
            raise BadSample(NO_CAPTION, f"sample {sample.key}: caption is {type(caption).__name__}, not text")
        usable = [text for text in (clean_caption(c, self.max_words) for c in caption if isinstance(c, str))
                  if has_words(text)]
        if not usable:
            raise BadSample(NO_CAPTION, f"sample {sample.key}: no caption left after cleaning in {caption!r}"[:300])
        # pretrain_dataset: random.choice(ann['caption']), drawn here from the sample's own generator
        caption = usable[self.rng(sample.key, _CAPTION_DRAW).integers(len(usable))]
        if self.transform is not None:
            image = self.transform(sample.image, self.rng(sample.key, _IMAGE_DRAW))
        else:
            what = sample.image_path or f"{sample.extra.get('shard', '')}:{sample.key}"
            image = _dali_readable(sample.image_bytes, self.stream.stats, what)
        return _Pair(sample.key, image, caption, sample.extra.get("img_id"))


class _CollatePairs:
    """Runs in the worker: tokenize the batch's captions (padded to the longest), stack the images."""

    def __init__(self, tokenizer: BlipTokenizer, max_length: int, prompt: str = ""):
        self.tokenizer, self.max_length, self.prompt = tokenizer, max_length, prompt

    def __call__(self, pairs: list[_Pair]) -> CaptionBatch | _EncodedBatch:
        text = self.tokenizer([self.prompt + pair.caption for pair in pairs], max_length=self.max_length,
                              padding="longest")
        keys = [pair.key for pair in pairs]
        ids = [pair.img_id for pair in pairs]
        img_ids = torch.tensor(ids, dtype=torch.long) if all(isinstance(i, int) for i in ids) else None
        if isinstance(pairs[0].image, bytes):
            return _EncodedBatch([pair.image for pair in pairs], text.input_ids, text.attention_mask, keys, img_ids)
        return CaptionBatch(torch.stack([pair.image for pair in pairs]), text.input_ids, text.attention_mask, keys,
                            img_ids)


def check_batch_settings(transform: TransformConfig, batch_size: int) -> None:
    """The checks every task's batches make of the settings they share (a ValueError for a mistake)."""
    if not isinstance(transform, TransformConfig):
        raise ValueError(f"transform must be a TransformConfig; got {type(transform).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def _resolve_backend(backend: str, dali: DaliOptions) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "pil":
        return "pil"
    if not HAS_DALI:
        if backend == "dali":
            raise ValueError("backend='dali' needs NVIDIA DALI, which is not installed (pip install "
                             "nvidia-dali-cuda130); use backend='pil', or 'auto' to fall back to it")
        log.info("caption batches: NVIDIA DALI is not installed; transforming images with PIL")
        return "pil"
    device = dali.resolved_device()
    if device == "gpu" and not torch.cuda.is_available():
        raise ValueError("DaliOptions(device='gpu') needs a CUDA device; use device='cpu' or backend='pil'")
    if backend == "auto" and device != "gpu":
        # DALI's gain is decoding on the GPU; on the CPU the PIL path is kept, whose crops do not
        # depend on how samples are batched
        return "pil"
    return f"dali_{device}"


class ResumableBatches:
    """A task's training batches, resumable mid-epoch: the samples of ``source``, each made by ``prepare`` in the
    DataLoader workers, batched by ``collate`` (a list of prepared samples -> a batch).

    ``decode`` is the :class:`~blip_fast.data.stream.SampleStream`'s (``pil``: ``prepare`` gets the decoded
    image); ``backend`` names what transforms the images, for the log and the state. ``num_workers``, ``seed``,
    ``shuffle``, ``shuffle_buffer``, ``rank`` and ``world_size`` are the stream's; ``drop_last`` drops each worker's
    last, partial batch (:class:`~blip_fast.data.loader.ResumableLoader`). Iterating gives the rest of the current
    epoch; ``state_dict()`` is the place as of the last batch handed out, and an object built with the same
    settings that loads it continues with exactly the batches this one would have given.
    """

    what = "batches"
    """What the batches are, for the log."""
    state_keys: tuple[str, ...] = ("loader", "backend")
    """The keys of :meth:`state_dict`."""

    def __init__(self, source, transform: TransformConfig, batch_size: int, prepare: SamplePrepare, collate, *,
                 decode: str = "pil", backend: str = "pil", num_workers: int = 0, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1000, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = True, pin_memory: bool = False):
        self.transform, self.seed = transform, seed
        self._backend = backend
        self._prepare = prepare
        stream = SampleStream(source, seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer, rank=rank,
                              world_size=world_size, decode=decode, transform=prepare)
        prepare.stream = stream
        # pin_memory: the batches' host tensors page-locked (training on a GPU), so their copies there are asynchronous
        self._loader = ResumableLoader(stream, batch_size, num_workers=num_workers, drop_last=drop_last,
                                       collate_fn=collate, pin_memory=pin_memory)
        self._state: dict | None = None          # loader state after the last batch handed out (None: the loader's)
        self._open: weakref.ref | None = None    # the pass under way, if the caller still holds it
        self._ahead: Callable[[object], object] | None = None  # read_ahead's function
        log.info("%s: %s, %s %dpx, batch %d, %d workers", self.what, backend, transform.kind, transform.image_size,
                 batch_size, num_workers)

    @property
    def backend(self) -> str:
        """What transforms the images: ``pil``, ``dali_cpu`` or ``dali_gpu``."""
        return self._backend

    def _loader_state(self) -> dict:
        return self._state if self._state is not None else self._loader.state_dict()

    @property
    def epoch(self) -> int:
        return int(self._loader_state()["epoch"])

    @property
    def stats(self) -> DataStats:
        """Counts of samples handed out, skipped and fixed, over every epoch so far."""
        return DataStats.from_dict(self._loader_state()["stats"])

    def set_epoch(self, epoch: int) -> None:
        """Go to ``epoch``: from its beginning, unless it is the current epoch (then it continues)."""
        self._rewind()
        if epoch != self._loader.epoch:
            self._leave_epoch()
        self._loader.set_epoch(epoch)

    def _leave_epoch(self) -> None:
        """What the batches hold for the epoch they leave, dropped (nothing here)."""

    def read_ahead(self, start: Callable[[object], object] | None) -> None:
        """Read each batch one batch before it is handed out, and hand out ``start(batch)``, called as soon as it is
        read: the trainer starts the batch's copy to the GPU there, which then runs while the step before it does
        (blip_fast.train.prefetch). None: hand out batches as they are read. :meth:`state_dict` stays the place as of
        the last batch handed out, not of the one read ahead, so resume is as exact as without."""
        self._ahead = start

    def state_dict(self) -> dict:
        """Where the batches are, as of the last one handed out (JSON-serialisable)."""
        return {"loader": self._loader_state(), "backend": self._backend}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (:meth:`state_dict` of an object of this class with the same settings)."""
        if not isinstance(state, dict) or not set(self.state_keys) <= set(state):
            keys = ", ".join(self.state_keys[:-1]) + " and " + self.state_keys[-1]
            raise ValueError(f"not a {type(self).__name__} state: expected the keys {keys}")
        self._close_open_pass()
        self._loader.load_state_dict(state["loader"])
        self._state = None

    def _close_open_pass(self) -> None:
        open_pass = self._open() if self._open is not None else None
        if open_pass is not None:
            open_pass.close()

    def _rewind(self) -> None:
        """Close an unfinished pass and take the loader back to the last batch handed out (it may have read further)."""
        self._close_open_pass()
        if self._state is not None:
            self._loader.load_state_dict(self._state)
            self._state = None

    def __iter__(self) -> Iterator:
        """The rest of the current epoch; the next call continues with the next epoch."""
        self._rewind()
        batches = self._pass()
        # a weak reference: an iterator the caller drops is closed at once (with a DALI pipeline still whole)
        self._open = weakref.ref(batches)
        return batches

    def _pass(self) -> Iterator:
        self._prepare.epoch = self._loader.epoch
        batches = self._batches()
        try:
            for batch, state in (batches if self._ahead is None else _one_ahead(batches, self._ahead)):
                self._state = state
                yield batch
            self._state = None          # the epoch is over: the loader is at the next one's start
            self._leave_epoch()
        finally:
            batches.close()
            self._open = None

    def _batches(self) -> Iterator[tuple[object, dict]]:
        """Each batch of the pass with the loader state after it."""
        loader = iter(self._loader)
        try:
            for batch in loader:
                yield batch, self._loader.state_dict()
        finally:
            loader.close()


def _one_ahead(batches: Iterator[tuple[object, dict]], start: Callable[[object], object]
               ) -> Iterator[tuple[object, dict]]:
    """``(start(batch), state)`` for each of ``batches``, each read and started before the previous one is handed
    out; the state stays the one read with its batch."""
    started = None
    for batch, state in batches:
        following = (start(batch), state)
        if started is not None:
            yield started
        started = following
    if started is not None:
        yield started


class CaptionBatches(ResumableBatches):
    """Training batches of (image, caption) pairs from any caption source, resumable (see the module docstring).

    ``source``: :class:`~blip_fast.data.annotations.CaptionAnnotations`, ``RetrievalAnnotations`` or
    :class:`~blip_fast.data.shards.TarShards` (:func:`open_caption_source`). ``backend``: ``pil``,
    ``dali`` (an error if DALI is not installed) or ``auto`` (DALI on the GPU when both are there, else
    PIL). ``dali`` configures DALI; its ``batch_size`` is replaced by ``batch_size`` and its ``inputs``
    must be ``encoded``. ``num_workers``, ``seed``, ``shuffle``, ``shuffle_buffer``, ``rank`` and
    ``world_size`` are the :class:`~blip_fast.data.stream.SampleStream`'s; ``drop_last`` drops each
    worker's last, partial batch (:class:`~blip_fast.data.loader.ResumableLoader`). ``prompt`` goes before each
    cleaned caption, as the original's caption fine-tuning writes ``prompt + pre_caption(caption)``.
    """

    what = "caption batches"
    state_keys = ("loader", "backend", "dali_checkpoint")

    def __init__(self, source, transform: TransformConfig, batch_size: int, *, backend: str = "pil",
                 num_workers: int = 0, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 rank: int | None = None, world_size: int | None = None, max_words: int = 30,
                 max_length: int = 30, drop_last: bool = True, dali: DaliOptions | None = None,
                 tokenizer: BlipTokenizer | None = None, prompt: str = "", pin_memory: bool = False):
        if isinstance(source, VqaAnnotations):
            raise ValueError("a VQA source has questions, not captions; use CaptionAnnotations or TarShards")
        if isinstance(source, NlvrAnnotations):
            raise ValueError("an NLVR2 source has statements about pairs of images, not captions; use NlvrBatches")
        check_batch_settings(transform, batch_size)
        if max_words < 1:
            raise ValueError(f"max_words must be at least 1, got {max_words}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
        dali = dali or DaliOptions()
        if dali.inputs != "encoded":
            raise ValueError("CaptionBatches feeds DALI encoded image bytes; leave DaliOptions.inputs='encoded'")
        resolved = _resolve_backend(backend, dali)
        self.dali = dataclasses.replace(dali, batch_size=batch_size)
        pil = resolved == "pil"
        self._checkpoint: bytes | None = None    # DALI state to build the next pipeline from
        self._dali_loader: DaliTransformLoader | None = None   # the pipeline of the last pass, if unfinished
        super().__init__(source, transform, batch_size, _PrepareSample(PilTransform(transform) if pil else None,
                                                                         max_words, seed),
                         _CollatePairs(tokenizer or BlipTokenizer(), max_length, prompt),
                         decode="pil" if pil else "bytes", backend=resolved, num_workers=num_workers, seed=seed,
                         shuffle=shuffle, shuffle_buffer=shuffle_buffer, rank=rank, world_size=world_size,
                         drop_last=drop_last, pin_memory=pin_memory)

    def _leave_epoch(self) -> None:
        self._checkpoint = None      # another epoch's pipeline starts from its own seed

    def state_dict(self) -> dict:
        checkpoint = self._dali_loader.checkpoint() if self._dali_loader is not None else self._checkpoint
        return {**super().state_dict(),
                "dali_checkpoint": None if checkpoint is None else base64.b64encode(checkpoint).decode("ascii")}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        # the pipeline of a pass this object left unfinished reads where that pass was, not where the state is
        self._checkpoint, self._dali_loader = None, None
        if state["backend"] != self._backend:
            if self.transform.train:
                log.warning("data state saved with backend %s, resuming with %s: the same samples and captions, "
                            "but fresh random crops and augmentation", state["backend"], self._backend)
        elif state["dali_checkpoint"] is not None:
            try:
                self._checkpoint = base64.b64decode(state["dali_checkpoint"], validate=True)
            except binascii.Error:
                raise ValueError("the state's dali_checkpoint is not base64 (was it edited?)") from None

    def _rewind(self) -> None:
        super()._rewind()
        if self._dali_loader is not None:        # DALI read further: its checkpoint is as of the last batch handed out
            self._checkpoint = self._dali_loader.checkpoint()
            self._dali_loader = None

    def _batches(self) -> Iterator[tuple[CaptionBatch, dict]]:
        return super()._batches() if self._backend == "pil" else self._dali_batches()

    def _dali_seed(self, epoch: int) -> int:
        base = self.dali.seed if self.dali.seed is not None else self.seed
        return int(np.random.SeedSequence([base, epoch, self._loader.stream.rank]).generate_state(1)[0] >> 1)

    def _dali_batches(self) -> Iterator[tuple[CaptionBatch, dict]]:
        loader = iter(self._loader)
        fed: deque[tuple[_EncodedBatch, dict]] = deque()   # in DALI's queue: each batch, the state after it

        def feed():
            for encoded in loader:
                fed.append((encoded, self._loader.state_dict()))
                yield encoded.images, range(len(encoded.images))

        feeder = feed()
        options = dataclasses.replace(self.dali, seed=self._dali_seed(self._loader.epoch))
        self._dali_loader = DaliTransformLoader(self.transform, feeder, options, checkpointing=True,
                                                 checkpoint=self._checkpoint)
        interrupted = False
        try:
            for images, indices in self._dali_loader:
                encoded, state = fed.popleft()
                img_ids = None if encoded.img_ids is None else encoded.img_ids[indices]
                yield CaptionBatch(images, encoded.input_ids[indices], encoded.attention_mask[indices],
                                   [encoded.keys[i] for i in indices.tolist()], img_ids), state
        except GeneratorExit:
            interrupted = True      # keep the pipeline: its checkpoint is the state as of the last batch handed out
            raise
        finally:
            feeder.close()
            loader.close()
            if not interrupted:
                self._dali_loader = None


def open_caption_source(kind: str, paths, image_root=None):
    """A caption source: ``json`` -> :class:`CaptionAnnotations` (BLIP's JSON lists; ``image_root`` is joined
    to relative image paths), ``shards`` -> :class:`TarShards` (a directory, glob, brace range or list)."""
    if kind == "json":
        return CaptionAnnotations(paths, image_root)
    if kind == "shards":
        if image_root is not None:
            raise ValueError("image_root applies to JSON lists; tar shards hold their images")
        source = TarShards(paths)
        if not any(os.path.isfile(shard) for shard in source.shards):
            raise FileNotFoundError(f"none of the {len(source.shards)} shard files of {paths!r} exists "
                                    f"(first: {source.shards[0]})")
        return source
    raise ValueError(f"caption source kind must be one of {SOURCE_KINDS}; got {kind!r}")
