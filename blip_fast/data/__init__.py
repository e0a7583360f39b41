"""Data: BLIP's dataset formats as sample sources, a resumable sharded loader, and the synthetic dataset.

    sample.py       Sample (one image + text) and DataStats (what was skipped or fixed, and why)
    decode.py       image bytes -> RGB (bad, truncated and odd-mode images), caption / question checks
    jpeg.py         is a JPEG cut short only after its image data? (decides what is recoverable)
    annotations.py  BLIP JSON lists: pretraining / Karpathy train, retrieval evaluation, VQA, NLVR2
    shards.py       webdataset tar shards (img2dataset layout): reader, source, writer
    stream.py       SampleStream: split by rank and worker, seeded shuffling, exact resume positions
    loader.py       ResumableLoader: a DataLoader with state_dict() / load_state_dict() and merged stats
    synthetic.py    procedurally drawn scenes with captions
    synth.py        `blip-fast data synth`: the synthetic dataset written as shards + JSON lists
    transforms.py   BLIP's pretraining / fine-tuning / evaluation transforms (RandomAugment) with PIL
    dali_pipeline.py  the same transforms as DALI pipelines (GPU decode, or CPU-only), PIL fallback
    batches.py      ResumableBatches (what every task's training batches share) and CaptionBatches: a caption
                    source -> transformed images + tokenized captions
    task_batches.py VqaBatches, NlvrBatches: VQA questions and answers, NLVR2 image pairs and statements
"""

import importlib

from .annotations import CaptionAnnotations, NlvrAnnotations, RetrievalAnnotations, VqaAnnotations
from .decode import check_caption, decode_image
from .loader import ResumableLoader
from .sample import BadSample, DataStats, Sample
from .shards import ShardWriter, TarShards
from .stream import SampleStream
from .synth import write_synthetic_dataset

__all__ = ["BadSample", "CaptionAnnotations", "CaptionBatch", "CaptionBatches", "DataStats", "NlvrAnnotations",
           "NlvrBatch", "NlvrBatches", "ResumableBatches", "ResumableLoader", "RetrievalAnnotations", "Sample",
           "SampleStream", "ShardWriter", "TarShards", "VqaAnnotations", "VqaBatch", "VqaBatches", "check_caption",
           "decode_image", "open_caption_source", "write_synthetic_dataset"]

_LAZY = {"CaptionBatch": "batches", "CaptionBatches": "batches", "ResumableBatches": "batches",
         "open_caption_source": "batches", "NlvrBatch": "task_batches", "NlvrBatches": "task_batches",
         "VqaBatch": "task_batches", "VqaBatches": "task_batches"}


def __getattr__(name: str):
    # batches.py imports NVIDIA DALI (half a second), and task_batches.py imports batches.py: load them when one of
    # their names is first used, not with every module of this package
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
