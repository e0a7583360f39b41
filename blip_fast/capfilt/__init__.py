"""CapFilt (BLIP paper, section 3.3): caption every image, filter every (image, text) pair, write the bootstrapped
dataset. :mod:`.scoring` holds the two models' work, :mod:`.units` the input's units, :mod:`.run` the resumable,
multi-rank command (``blip-fast capfilt``); docs/capfilt.md tells how to use it."""

from .run import CapfiltConfig, run_capfilt, summary
from .scoring import CAPFILT_GENERATION, filter_pairs, synthetic_captions

__all__ = ["CAPFILT_GENERATION", "CapfiltConfig", "filter_pairs", "run_capfilt", "summary", "synthetic_captions"]
