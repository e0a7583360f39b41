"""MED: BLIP's multimodal mixture of encoder-decoder (paper section 3.1, ``models/med.py``).

One BERT-base transformer used in three functionalities:

* **unimodal text encoder** -- bidirectional self-attention only; its [CLS] state is the text
  feature of the ITC loss (``TextTransformer.forward`` without a context);
* **image-grounded text encoder** -- every layer adds cross-attention to the image tokens between
  self-attention and feed-forward; input starts with [ENC]; its first state feeds the ITM head;
* **image-grounded text decoder** -- causal self-attention, same cross-attention and
  feed-forward; input starts with [DEC]; an LM head tied to the word embeddings.

Each layer is self-attention, cross-attention where there is a context, feed-forward
(:class:`TextLayer`). How the rows attend -- their padding, causality, context -- is the pass's, not
the layer's: the transformer hands every layer a small context object, here :class:`PaddedRows`.

In pretraining the encoder and the decoder share every weight except the self-attention
(``share_all_but_self_attention``). Parameter names are those of the original (BERT's), so
checkpoints load without renaming.

The context (image tokens, or the question's states for VQA's answer decoder) enters the text
transformer only through each layer's cross-attention keys and values. They can be computed once
(``TextTransformer.context_keys_values``) and handed to several passes over the same context
(``context_kv=``): pretraining projects the image tokens once for its ITM and LM rows. When
decoding, a :class:`KVCache` keeps the context's keys and values of the first step and every
generated token's self-attention keys and values, so each step computes its new token only.

Faster ways through the same layers -- captions without their padding (``packing=``), a packed
attention kernel, image keys/values shared by blocks of rows (:class:`BlockContext`), passes of the
encoder and the decoder run together (:func:`joint_text_passes`) -- live in
:mod:`blip_fast.models.fast_passes`, which hands the layers context objects of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import TextConfig
from .fast_passes import BlockContext, PackedAttention, TextPass, fast_text_pass, joint_text_passes
from .packing import PackedText

# the fast passes' public names too: callers import them from here, with the model they run
__all__ = ["BlockContext", "KVCache", "PackedAttention", "PaddedRows", "TextDecoder", "TextLayer", "TextPass",
           "TextTransformer", "joint_text_passes", "share_all_but_self_attention"]


@dataclass
class KVCache:
    """Keys/values of past decoder tokens (self-attention) and of the context (cross-attention).

    Self-attention: per layer a (k, v) buffer (N, H, ``capacity``, D) allocated at the first step and filled a
    step at a time (no concatenation, no reallocation); ``length`` tokens are cached. Cross-attention: the
    context's keys/values, computed once from the image (or question) tokens at the first step. With
    ``shared_by`` > 1, each context row serves that many consecutive decoded rows (an image's beams or its
    sampled captions): the context is held once per image, never repeated, and beam search's reordering (within
    an image's rows) leaves it alone.
    """

    capacity: int
    """Tokens a row can hold, prompt included."""
    shared_by: int = 1
    self_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    cross_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    length: int = 0
    """Tokens cached so far (the text transformer advances it after each step's layers; in static mode, the caller)."""
    position: torch.Tensor | None = None
    """Static mode (set by the caller, after the prompt's step): a 0-d long tensor on the device, where this step's
    one token goes. The step then writes there, attends to every slot of the buffers with the ones past it masked,
    and leaves ``length`` alone: its shapes and buffers are the same at every step, as a CUDA graph needs."""

    @classmethod
    def empty(cls, num_layers: int, capacity: int, shared_by: int = 1) -> KVCache:
        if capacity < 1 or shared_by < 1:
            raise ValueError(f"a cache needs capacity >= 1 and shared_by >= 1; got {capacity}, {shared_by}")
        return cls(capacity, shared_by, [None] * num_layers, [None] * num_layers)

    def append(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s keys/values (N, H, L, D) of this step written after the cached ones; returns every
        cached token's, this step's included."""
        stop = self.length + keys.shape[2]
        if stop > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} tokens; this step would make {stop}")
        if self.self_kv[index] is None:
            shape = (keys.shape[0], keys.shape[1], self.capacity, keys.shape[3])
            # zeros, not empty: a static step attends to the unwritten slots with weight 0, and 0 x NaN garbage is NaN
            self.self_kv[index] = (keys.new_zeros(shape), values.new_zeros(shape))
        cached_keys, cached_values = self.self_kv[index]
        cached_keys[:, :, self.length:stop] = keys
        cached_values[:, :, self.length:stop] = values
        return cached_keys[:, :, :stop], cached_values[:, :, :stop]

    def write(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Static mode: layer ``index``'s keys/values (N, H, 1, D) written at ``position``; returns the whole
        buffers (N, H, capacity, D), which :meth:`visible` masks."""
        cached_keys, cached_values = self.self_kv[index]
        cached_keys.index_copy_(2, self.position.view(1), keys)
        cached_values.index_copy_(2, self.position.view(1), values)
        return cached_keys, cached_values

    def visible(self, rows: int) -> torch.Tensor:
        """Static mode: (rows, capacity) True on the slots up to ``position``."""
        slots = torch.arange(self.capacity, device=self.position.device)
        return (slots <= self.position)[None].expand(rows, self.capacity)

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` continues row ``index[i]`` (beam search; ``index`` stays within each context row's group, so
        the shared context does not move). Only the cached tokens are copied."""
        for entry in self.self_kv:
            if entry is not None:
                for buffer in entry:
                    buffer[:, :, :self.length] = buffer[:, :, :self.length].index_select(0, index)
        if self.shared_by == 1:
            self.cross_kv = [None if e is None else (e[0].index_select(0, index), e[1].index_select(0, index))
                             for e in self.cross_kv]


class TextEmbeddings(nn.Module):
    """Word + learned position embeddings, LayerNorm, dropout (no token types in BLIP)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.max_positions = config.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        """(B, L) ids, following ``past_length`` cached tokens -> (B, L, hidden)."""
        length = input_ids.shape[1]
        self.check_length(past_length + length)
        return self.tokens(input_ids, torch.arange(past_length, past_length + length, device=input_ids.device))

    def tokens(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Embeddings of tokens ``ids`` at ``positions`` (broadcast against ``ids``)."""
        return self.dropout(self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions)))

    def check_length(self, length: int) -> None:
        if length > self.max_positions:
            raise ValueError(f"text of {length} tokens exceeds the {self.max_positions} position embeddings")


class SelfAttentionProjections(nn.Module):
    """Query/key/value projections; keys and values read ``kv_width``-wide context tokens."""

    def __init__(self, config: TextConfig, kv_width: int):
        super().__init__()
        self.num_heads = config.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, width) -> (B, H, L, D)."""
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Self-attention's (q, k, v), each (B, H, L, D), of ``x`` (B, L, hidden)."""
        return tuple(self.heads(t) for t in self.stacked(x).split(self.query.out_features, dim=-1))

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., 3 * hidden): queries, keys and values.

        One GEMM over the three weights stacked: the same products as three, but ``x`` is read once and its
        gradient is that GEMM's sum instead of three gradients added.
        """
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        return F.linear(x, weight, bias)


class AttentionOutput(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``LayerNorm(dropout(dense(x)) + residual)`` (``BertSelfOutput``), the last three as one op."""
        norm = self.LayerNorm
        return ops.residual_layer_norm(self.dense(x), residual, norm.weight, norm.bias, norm.eps,
                                       self.dropout.p if self.training else 0.0)


class TextAttention(nn.Module):
    """Self- or cross-attention sublayer: projections, the ops-layer attention, output + residual."""

    def __init__(self, config: TextConfig, kv_width: int):
        super().__init__()
        self.self = SelfAttentionProjections(config, kv_width)
        self.output = AttentionOutput(config)
        self.dropout_p = config.attention_dropout

    @property
    def dropout_p_now(self) -> float:
        """Attention dropout: ``dropout_p`` in training, 0 in eval."""
        return self.dropout_p if self.training else 0.0

    def forward(self, x: torch.Tensor, keys_values: tuple[torch.Tensor, torch.Tensor], key_padding_mask,
                causal: bool, queries: torch.Tensor | None = None, shared_by: int = 1,
                decoding: bool = False) -> torch.Tensor:
        """``x`` (B, L, hidden) attends to ``keys_values`` (k, v) each (B, H, N, D) where ``key_padding_mask``
        (B, N) is True (None: every key); ``queries`` (B, H, L, D) when already projected. ``shared_by`` > 1: x
        has ``shared_by`` rows per keys/values row, consecutive; their queries are stacked along the sequence
        against that row (exact without causality: each query attends on its own). ``decoding``: a generation
        step's few queries against a cache or the shared context, which ``ops.decode_attention`` takes (without
        causality or dropout; otherwise ``ops.attention`` does)."""
        q = self.self.heads(self.self.query(x)) if queries is None else queries
        rows, heads, length, dim = q.shape
        if shared_by > 1:
            q = q.view(rows // shared_by, shared_by, heads, length, dim).transpose(1, 2)
            q = q.reshape(rows // shared_by, heads, shared_by * length, dim)
        if decoding and not causal and self.dropout_p_now == 0.0:
            out = ops.decode_attention(q, *keys_values, key_padding_mask)
        else:
            out = ops.attention(q, *keys_values, key_padding_mask, causal, self.dropout_p_now)
        if shared_by > 1:
            out = out.view(rows // shared_by, heads, shared_by, length, dim).transpose(1, 2)
            out = out.reshape(rows, heads, length, dim)
        return self.output(out.transpose(1, 2).flatten(2), x)  # (B, H, L, D) -> (B, L, hidden)


class PaddedRows(NamedTuple):
    """How the padded rows (B, L, hidden) of one text pass attend in one layer: the per-layer context of
    :meth:`TextLayer.forward`. The fast passes have their own (blip_fast.models.fast_passes), with the same
    ``grounded``, ``attend_self`` and ``attend_context``.

    A tuple of tensors, bools and the layer's index, made afresh for each layer: under ``torch.compile``
    (blip_fast.models.compile) it is an argument of the compiled layer, guarded field by field as it is read.
    """

    padding_mask: torch.Tensor | None
    """(B, L_total) True on real tokens (with a cache, the cached ones too); None: all real."""
    causal: bool
    context: tuple[torch.Tensor, torch.Tensor] | None
    """This layer's cross-attention (k, v), each (B, H, N, D); None: no cross-attention."""
    context_mask: torch.Tensor | None
    """(B, N) True on valid context tokens; None: all valid."""
    cache: KVCache | None
    """Only when decoding: the self-attention keys/values of the past tokens, extended in place."""
    index: int
    """The layer's entry in ``cache``."""

    @property
    def grounded(self) -> bool:
        return self.context is not None

    def attend_self(self, attention: TextAttention, x: torch.Tensor) -> torch.Tensor:
        q, k, v = attention.self.queries_keys_values(x)
        causal = self.causal
        if self.cache is not None and self.cache.position is not None:  # static mode: padding_mask is the visible slots
            k, v = self.cache.write(self.index, k, v)
            return attention(x, (k, v), self.padding_mask, False, queries=q, decoding=True)
        if self.cache is not None:  # this step's keys/values after the cached ones
            # past the first step each new query sees every cached key. Decided by an ``if`` on the cache's length,
            # not by comparing shapes: under torch.compile a shape comparison is a symbolic bool, which attention's
            # is_causal refuses, where an ``if`` becomes a guard
            if self.cache.length > 0:
                causal = False
            k, v = self.cache.append(self.index, k, v)
        return attention(x, (k, v), self.padding_mask, causal, queries=q, decoding=self.cache is not None)

    def attend_context(self, crossattention: TextAttention, x: torch.Tensor) -> torch.Tensor:
        shared_by = 1 if self.cache is None else self.cache.shared_by
        return crossattention(x, self.context, self.context_mask, False, shared_by=shared_by,
                              decoding=self.cache is not None)


class TextLayer(nn.Module):
    def __init__(self, config: TextConfig, encoder_width: int | None):
        super().__init__()
        self.attention = TextAttention(config, config.hidden_size)
        if encoder_width is not None:
            self.crossattention = TextAttention(config, encoder_width)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output = AttentionOutput(config)
        self.output.dense = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, rows: PaddedRows) -> torch.Tensor:
        """BERT's layer (``BertLayer``) with BLIP's cross-attention; ``rows``: how the rows of ``x`` attend (its
        padding, causality and context, :class:`PaddedRows`, or a fast pass's)."""
        x = rows.attend_self(self.attention, x)
        if rows.grounded:
            x = rows.attend_context(self.crossattention, x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class TextTransformer(nn.Module):
    """BERT without pooler (``BertModel(add_pooling_layer=False)``), with optional cross-attention."""

    def __init__(self, config: TextConfig, encoder_width: int | None):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(TextLayer(config, encoder_width) for _ in range(config.num_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT init as BLIP's ``_init_weights``: N(0, 0.02) for Linear/Embedding, LayerNorm 1/0."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def context_keys_values(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's cross-attention keys and values, each (B, H, N, D), of ``context`` (B, N, width).

        Gradients flow back through them to the key/value projections and to ``context``, so one
        result may feed several passes (rows picked with ``k[index]`` along the batch) in training.

        All layers' projections are one GEMM, with their weights stacked: the same products, but the
        context is read (and under autocast cast to bf16) once instead of twice per layer, and its
        gradient is one GEMM's fp32 sum instead of 2 x layers gradients cast back and added one by one.
        """
        if not hasattr(self.encoder.layer[0], "crossattention"):
            raise ValueError("this text transformer has no cross-attention layers")
        projections = [layer.crossattention.self for layer in self.encoder.layer]
        linears = [linear for p in projections for linear in (p.key, p.value)]
        weight = torch.cat([linear.weight for linear in linears])
        bias = torch.cat([linear.bias for linear in linears])
        keys_values = F.linear(context, weight, bias).split(self.config.hidden_size, dim=-1)
        return [(p.heads(keys_values[2 * i]), p.heads(keys_values[2 * i + 1])) for i, p in enumerate(projections)]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        context_kv: list[tuple[torch.Tensor, torch.Tensor] | BlockContext] | None = None,
        packing: PackedText | None = None,
    ) -> torch.Tensor:
        """Token ids (B, L) -> hidden states (B, L, hidden); with ``packing`` (the captions' real tokens, see
        :class:`~blip_fast.models.packing.PackedText`), (T, hidden) for its packed tokens.

        ``attention_mask`` (B, L_total) marks real tokens (1) and padding (0); with a cache it
        covers the cached tokens too. A context switches the cross-attention on, given either as
        ``encoder_hidden_states`` (B, N, width) or as its per-layer keys/values ``context_kv``
        (:meth:`context_keys_values`), per layer a (k, v) pair or a :class:`BlockContext`;
        ``encoder_attention_mask`` (B, N) marks its valid tokens (None: all; a BlockContext takes none).
        A cache keeps the context's keys/values of its first step for the later ones.
        """
        context_kv = self._layers_context(input_ids, encoder_hidden_states, context_kv, cache)
        padding_mask = None if attention_mask is None else attention_mask.bool()
        context_mask = None if encoder_attention_mask is None else encoder_attention_mask.bool()
        if packing is not None or (context_kv is not None and isinstance(context_kv[0], BlockContext)):
            # rows without their padding, or blocks of rows sharing context rows: the same layers, attending
            # another way (blip_fast.models.fast_passes)
            if cache is not None:
                raise ValueError("packing and a BlockContext take no cache")
            return fast_text_pass(self, input_ids, padding_mask, causal, context_kv, context_mask, packing)
        if cache is not None and cache.position is not None:  # static mode: the position is a device tensor
            if padding_mask is not None or input_ids.shape[1] != 1:
                raise ValueError("a static-mode decoding step takes one token per row and no attention mask")
            padding_mask = cache.visible(input_ids.shape[0])  # the written slots, once for every layer
            x = self.embeddings.tokens(input_ids, cache.position.view(1))
        else:
            x = self.embeddings(input_ids, 0 if cache is None else cache.length)
        for index, layer in enumerate(self.encoder.layer):
            context = None if context_kv is None else context_kv[index]
            x = layer(x, PaddedRows(padding_mask, causal, context, context_mask, cache, index))
        if cache is not None and cache.position is None:  # (a static step is replayed without Python: the caller)
            cache.length += input_ids.shape[1]
        return x

    def _layers_context(self, input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                        context_kv: list | None, cache: KVCache | None) -> list | None:
        """Each layer's cross-attention context of :meth:`forward` (None: none), checked; a cache keeps it at the
        first decoding step and gives it back at the later ones."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L); got {tuple(input_ids.shape)}")
        if encoder_hidden_states is not None and context_kv is not None:
            raise ValueError("give the context as encoder_hidden_states or as context_kv, not both")
        if encoder_hidden_states is None and context_kv is None:
            return None
        if cache is not None and cache.cross_kv and cache.cross_kv[0] is not None:
            return cache.cross_kv  # a later decoding step: the first step's entries
        if encoder_hidden_states is not None:
            context_kv = self.context_keys_values(encoder_hidden_states)
        elif not hasattr(self.encoder.layer[0], "crossattention"):
            raise ValueError("this text transformer has no cross-attention layers")
        elif len(context_kv) != len(self.encoder.layer):
            raise ValueError(f"context_kv has {len(context_kv)} entries for {len(self.encoder.layer)} layers")
        if cache is not None:
            cache.cross_kv = list(context_kv)
        return context_kv


class LMPredictionHead(nn.Module):
    """``cls.predictions``: dense + GELU + LayerNorm, then the vocabulary projection (tied)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform.LayerNorm(F.gelu(self.transform.dense(x)))


class TextDecoder(nn.Module):
    """Image-grounded text decoder (``BertLMHeadModel``): causal MED + tied LM head."""

    def __init__(self, config: TextConfig, encoder_width: int):
        super().__init__()
        self.config = config
        self.bert = TextTransformer(config, encoder_width)
        self.cls = nn.Module()
        self.cls.predictions = LMPredictionHead(config)
        nn.init.normal_(self.cls.predictions.transform.dense.weight, std=config.initializer_range)
        nn.init.zeros_(self.cls.predictions.transform.dense.bias)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def hidden_states(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask=None,
                      cache=None, context_kv=None, packing: PackedText | None = None) -> torch.Tensor:
        """Transformed hidden states (B, L, hidden), or (T, hidden) with ``packing``, the input of the
        vocabulary projection; the context as ``encoder_hidden_states`` or ``context_kv`` (see
        :meth:`TextTransformer.forward`)."""
        x = self.bert(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, causal=True,
                      cache=cache, context_kv=context_kv, packing=packing)
        return self.cls.predictions.hidden(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cls.predictions.decoder(hidden)

    def loss(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, targets,
             label_smoothing: float = 0.1, reduction: str = "mean", context_kv=None,
             packing: PackedText | None = None) -> torch.Tensor:
        """Next-token loss: position t predicts ``targets[:, t + 1]`` (``-100`` ignored, as it must be on
        padding).

        ``reduction='mean'`` averages over every predicted token of the batch; ``'sum_per_sample'``
        returns each sequence's summed loss (VQA weights answers per sample). With ``packing`` only the
        real tokens go through the decoder and the vocabulary projection, and the loss is the same.
        """
        hidden = self.hidden_states(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                    context_kv=context_kv, packing=packing)
        return self.loss_of_hidden(hidden, targets, label_smoothing, reduction, packing)

    def loss_of_hidden(self, hidden: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.1,
                       reduction: str = "mean", packing: PackedText | None = None) -> torch.Tensor:
        """:meth:`loss` from the transformed hidden states (:meth:`hidden_states`, or ``cls.predictions.hidden`` of
        the transformer's output) of the captions whose ``targets`` these are."""
        if reduction not in ("mean", "sum_per_sample"):
            raise ValueError(f"reduction must be 'mean' or 'sum_per_sample'; got {reduction!r}")
        if packing is not None:
            shifted = packing.next_token_targets(targets)  # (T,)
        else:
            hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(L-1), hidden)
            shifted = targets[:, 1:].reshape(-1)
        head = self.cls.predictions
        if reduction == "mean":
            return ops.lm_loss(hidden, head.decoder.weight, head.bias, shifted, label_smoothing, "mean")
        per_token = ops.lm_loss(hidden, head.decoder.weight, head.bias, shifted, label_smoothing, "none")
        if packing is not None:  # back to (B, L) by a gather, then summed: no atomics, deterministic
            return (packing.unpack(per_token) * packing.valid).sum(dim=1)
        return per_token.view(targets.shape[0], -1).sum(dim=1)


def share_all_but_self_attention(encoder: TextTransformer, decoder: TextDecoder) -> None:
    """Make ``decoder`` use ``encoder``'s embeddings, cross-attention and feed-forward modules.

    BLIP's ``tie_encoder_decoder_weights(text_encoder, text_decoder.bert, '', '/attention')``:
    every weight is shared except the self-attention sublayers (``layer.N.attention``); the LM
    head stays tied to the (now shared) word embeddings.
    """
    decoder.bert.embeddings = encoder.embeddings
    for enc_layer, dec_layer in zip(encoder.encoder.layer, decoder.bert.encoder.layer, strict=True):
        dec_layer.crossattention = enc_layer.crossattention
        dec_layer.intermediate = enc_layer.intermediate
        dec_layer.output = enc_layer.output
    decoder.cls.predictions.decoder.weight = encoder.embeddings.word_embeddings.weight
