"""The one home of BLIP's hot operations; every model calls them through here.

Each op has a pure-PyTorch reference (always selectable) and registered fast implementations;
see :mod:`blip_fast.ops.registry` for how one is picked (``BLIP_FAST_IMPL`` / :func:`set_impl`).
"""

from .attention import attention, attention_ref
from .decode_attention import decode_attention
from .hard_negatives import sample_hard_negatives
from .lm_loss import IGNORE_INDEX, lm_loss
from .losses import itc_loss, itm_loss
from .momentum import enqueue_, momentum_update_
from .registry import OPS, impl_scope, requested_impl, set_impl
from .residual_layer_norm import residual_layer_norm
from .varlen_attention import AttentionSequences, packed_attention_on, varlen_attention, varlen_cross_attention

__all__ = [
    "AttentionSequences",
    "IGNORE_INDEX",
    "OPS",
    "attention",
    "attention_ref",
    "decode_attention",
    "enqueue_",
    "impl_scope",
    "itc_loss",
    "itm_loss",
    "lm_loss",
    "momentum_update_",
    "packed_attention_on",
    "requested_impl",
    "residual_layer_norm",
    "sample_hard_negatives",
    "set_impl",
    "varlen_attention",
    "varlen_cross_attention",
]
