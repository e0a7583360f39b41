"""MED: BLIP's multimodal mixture of encoder-decoder (paper section 3.1, ``models/med.py``).

One BERT-base transformer used in three functionalities:

* **unimodal text encoder** -- bidirectional self-attention only; its [CLS] state is the text
  feature of the ITC loss (``TextTransformer.forward`` without a context);
* **image-grounded text encoder** -- every layer adds cross-attention to the image tokens between
  self-attention and feed-forward; input starts with [ENC]; its first state feeds the ITM head;
* **image-grounded text decoder** -- causal self-attention, same cross-attention and
  feed-forward; input starts with [DEC]; an LM head tied to the word embeddings.

In pretraining the encoder and the decoder share every weight except the self-attention
(``share_all_but_self_attention``). Parameter names are those of the original (BERT's), so
checkpoints load without renaming.

The context (image tokens, or the question's states for VQA's answer decoder) enters the text
transformer only through each layer's cross-attention keys and values. They can be computed once
(``TextTransformer.context_keys_values``) and handed to several passes over the same context
(``context_kv=``): pretraining projects the image tokens once for its 3B ITM rows and B LM rows
instead of 4B times, and generation keeps them in its ``KVCache``. Passes over transformers that share all but
their self-attention (pretraining's ITM encoder and LM decoder) can run layer by layer together
(:func:`joint_text_passes`): the rows of both through each shared weight at once.

The hidden states can also travel without the captions' padding (``packing=``, a
:class:`~blip_fast.models.packing.PackedText`): (T, hidden) for the T real tokens, unpacked to
(B, L) only around attention. Pretraining's fast path runs its text passes that way. Where the
packed attention kernel is the selected backend (opt-in), attention too reads the packed rows and is not
unpacked (:class:`PackedAttention`): self-attention with :func:`~blip_fast.ops.varlen_attention`,
cross-attention with :func:`~blip_fast.ops.varlen_cross_attention`, each chosen on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import TextConfig
from ..ops import AttentionSequences
from .packing import PackedText


@dataclass
class KVCache:
    """Keys/values of past decoder tokens (self-attention) and of the context (cross-attention).

    Tensors are ``(B, H, L, D)`` per layer. The cross-attention entries are computed once from
    the image (or question) tokens and reused at every generated step.
    """

    self_kv: list[tuple[torch.Tensor, torch.Tensor] | None]
    cross_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)

    @classmethod
    def empty(cls, num_layers: int) -> KVCache:
        return cls([None] * num_layers, [None] * num_layers)

    @property
    def length(self) -> int:
        first = self.self_kv[0]
        return 0 if first is None else first[0].shape[2]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` of the batch (beam search)."""
        def pick(entry):
            return None if entry is None else (entry[0].index_select(0, index), entry[1].index_select(0, index))

        self.self_kv = [pick(e) for e in self.self_kv]
        self.cross_kv = [pick(e) for e in self.cross_kv]


class BlockContext(NamedTuple):
    """One layer's cross-attention context for rows that come in blocks sharing context rows.

    ``segments``: ``(keys, values, repeats, rows)``, keys/values (C, H, N, D) each and ``rows`` None or a (R,)
    index of their rows, whose picked rows (all C for None) are the segment's context rows; a segment covers the
    next ``repeats * R`` query rows, in ``repeats`` blocks of R rows, row r of every block attending to context
    row r. Such a block's queries are stacked along the sequence into one row of ``repeats * L`` queries: with no
    key mask and no causality each query attends on its own, so the result is the same attention, while the
    context rows are neither copied nor read more than once. Pretraining's ITM uses it: the positive and the
    negative-text rows of an image share its keys/values, and the negative-image rows pick theirs
    (blip_fast.models.blip_pretrain). Packed attention (:func:`~blip_fast.ops.varlen_cross_attention`) reads the picked
    rows where they are, without gathering them, when every segment shares one keys tensor.
    """

    segments: tuple[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None], ...]

    def attend(self, q: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """Attention of queries ``q`` (sum of repeats * R, H, L, D) to the segments' keys/values."""
        outputs, start = [], 0
        for keys, values, repeats, rows in self.segments:
            if rows is not None:
                keys, values = keys[rows], values[rows]
            count = keys.shape[0]
            block = q[start:start + repeats * count]
            start += repeats * count
            if repeats == 1:
                outputs.append(ops.attention(block, keys, values, None, False, dropout_p))
                continue
            _, heads, length, dim = block.shape
            stacked = block.reshape(repeats, count, heads, length, dim).permute(1, 2, 0, 3, 4)
            out = ops.attention(stacked.reshape(count, heads, repeats * length, dim), keys, values, None, False,
                                dropout_p)
            outputs.append(out.reshape(count, heads, repeats, length, dim).permute(2, 0, 1, 3, 4)
                           .reshape(repeats * count, heads, length, dim))
        if start != q.shape[0]:
            raise ValueError(f"the context's segments cover {start} rows, the queries have {q.shape[0]}")
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def shared_keys_values(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keys, values) when every segment reads the same ones (packed attention then reads them in place)."""
        keys, values = self.segments[0][:2]
        if any(k is not keys or v is not values for k, v, _, _ in self.segments):
            return None
        return keys, values

    def picks_like(self, other: BlockContext) -> bool:
        """Whether the segments repeat and pick the very same rows as ``other``'s (by identity: comparing values
        would wait for the device)."""
        return len(self.segments) == len(other.segments) and all(
            mine[2] == theirs[2] and mine[3] is theirs[3]
            for mine, theirs in zip(self.segments, other.segments, strict=True))

    def context_rows(self) -> torch.Tensor:
        """The row of the (shared) keys that each query row attends to."""
        count = self.segments[0][0].shape[0]
        return torch.cat([(torch.arange(count, device=keys.device) if rows is None else rows).repeat(repeats)
                          for keys, _, repeats, rows in self.segments])


class PackedAttention(NamedTuple):
    """The sequence tables with which one packed text pass attends on its packed rows (no unpacking), made once per
    pass (:meth:`plan`) and used by every layer: its self-attention's and its cross-attention's, each None where
    that attention unpacks around :func:`~blip_fast.ops.attention` instead."""

    self_attention: AttentionSequences | None
    """None also in a joint call (:func:`joint_text_passes`), whose groups carry their own."""
    cross_attention: AttentionSequences | None

    @classmethod
    def plan(cls, packing: PackedText, padding_mask: torch.Tensor, causal: bool, context_kv, context_mask,
             like: torch.Tensor) -> PackedAttention | None:
        """The tables of a pass over ``packing``'s rows for the attentions whose packed op takes tensors like
        ``like`` with its kernel (:func:`~blip_fast.ops.packed_attention_on`), or None where neither does. The
        cross-attention's table is also None where the context is not one a table can describe (a padded context,
        a :class:`BlockContext` whose segments read different keys, or layers whose contexts pick different rows;
        one table serves every layer): that attention unpacks.

        Self-attention: row b's queries are its packed tokens (all L positions of a dense row), its keys its real
        tokens (``padding_mask``). Cross-attention: row b's queries attend to every token of its context row, which
        is row b of a (k, v) pair or the row a :class:`BlockContext` picks for it, read where it lies.
        All of it is computed on the device: no synchronisation.
        """
        self_attention = cross = None
        if ops.packed_attention_on(like):
            self_attention = cls.self_attention_table(packing, padding_mask, causal)
        if context_kv is not None and ops.packed_attention_on(like, cross=True):
            cross = cls.cross_attention_table(packing, context_kv, context_mask)
        return None if self_attention is None and cross is None else cls(self_attention, cross)

    @staticmethod
    def self_attention_table(packing: PackedText, padding_mask: torch.Tensor, causal: bool) -> AttentionSequences:
        """The self-attention table of :meth:`plan`."""
        q_len = packing.valid.sum(dim=1)
        kv_len = q_len if causal else padding_mask.sum(dim=1)
        return AttentionSequences.self_attention(packing.first, q_len, kv_len, packing.length)

    @staticmethod
    def cross_attention_table(packing: PackedText, context_kv, context_mask) -> AttentionSequences | None:
        """The cross-attention table of :meth:`plan`, or None where no table can describe the context."""
        if context_mask is not None:
            return None
        device = packing.valid.device
        first = context_kv[0]
        if isinstance(first, BlockContext):
            if any(not isinstance(layer, BlockContext) or layer.shared_keys_values() is None
                   or not layer.picks_like(first) for layer in context_kv):
                return None
            keys, kv_group = first.segments[0][0], first.context_rows()
        else:
            keys, kv_group = first[0], torch.arange(packing.batch, device=device)
            if keys.shape[0] != packing.batch:
                return None
        contexts, tokens = keys.shape[0], keys.shape[2]
        kv_start = torch.arange(contexts, device=device) * tokens
        return AttentionSequences.grouped(packing.first, packing.valid.sum(dim=1), kv_group, kv_start,
                                          torch.full_like(kv_start, tokens), packing.length, tokens)


def _packed_context(keys_values) -> tuple[torch.Tensor, torch.Tensor]:
    """A cross-attention context's keys and values as rows (C * N, H, D) (views where their layout allows); a
    :class:`BlockContext`'s shared ones, which :meth:`PackedAttention.plan` checked."""
    if isinstance(keys_values, BlockContext):
        keys_values = keys_values.shared_keys_values()
    return tuple(t.transpose(1, 2).flatten(0, 1) for t in keys_values)


class TextEmbeddings(nn.Module):
    """Word + learned position embeddings, LayerNorm, dropout (no token types in BLIP)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.max_positions = config.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, past_length: int = 0, packing: PackedText | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, hidden); with ``packing``, (T, hidden) for its packed tokens."""
        length = input_ids.shape[1]
        if past_length + length > self.max_positions:
            raise ValueError(f"text of {past_length + length} tokens exceeds the {self.max_positions} "
                             "position embeddings")
        if packing is not None:
            x = self.word_embeddings(packing.pack(input_ids)) + self.position_embeddings(packing.positions)
        else:
            positions = torch.arange(past_length, past_length + length, device=input_ids.device)
            x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.dropout(self.LayerNorm(x))


class SelfAttentionProjections(nn.Module):
    """Query/key/value projections; keys and values read ``kv_width``-wide context tokens."""

    def __init__(self, config: TextConfig, kv_width: int):
        super().__init__()
        self.num_heads = config.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)

    def heads(self, x: torch.Tensor, packing: PackedText | None = None) -> torch.Tensor:
        """(B, L, width), or packed (T, width) with its ``packing``, -> (B, H, L, D)."""
        if packing is not None:
            x = packing.unpack(x)
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def queries_keys_values(self, x: torch.Tensor, packing: PackedText | None = None) -> tuple[torch.Tensor, ...]:
        """Self-attention's (q, k, v), each (B, H, L, D), of ``x`` (B, L, hidden) or packed (T, hidden).

        One GEMM over the three weights stacked: the same products as three, but ``x`` is read once and its
        gradient is that GEMM's sum instead of three gradients added; packed, one unpack instead of three.
        """
        qkv = self._stacked(x)
        if packing is not None:
            qkv = packing.unpack(qkv)
        return tuple(self.heads(t) for t in qkv.split(self.query.out_features, dim=-1))

    def packed_queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q, k, v), each (T, H, D), of packed ``x`` (T, hidden): views of the one GEMM's output, not unpacked."""
        return self._stacked(x).unflatten(-1, (3, self.num_heads, -1)).unbind(-3)

    def _stacked(self, x: torch.Tensor) -> torch.Tensor:
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
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class TextAttention(nn.Module):
    """Self- or cross-attention sublayer: projections, the ops-layer attention, output + residual."""

    def __init__(self, config: TextConfig, kv_width: int, cross: bool = False):
        super().__init__()
        self.self = SelfAttentionProjections(config, kv_width)
        self.output = AttentionOutput(config)
        self.dropout_p = config.attention_dropout
        self.cross = cross

    def forward(self, x, key_padding_mask, causal, keys_values, packing: PackedText | None = None,
                queries: torch.Tensor | None = None, sequences: AttentionSequences | None = None) -> torch.Tensor:
        """``keys_values``: (k, v) each (B, H, N, D), or a :class:`BlockContext` (no mask, not causal);
        ``x`` (B, L, hidden), or packed (T, hidden) with its ``packing``; ``queries`` (B, H, L, D) when already
        projected (self-attention projects them with its keys and values).

        With ``sequences`` (a table of :class:`PackedAttention`) the packed rows attend where they are
        (:func:`~blip_fast.ops.varlen_attention`, or :func:`~blip_fast.ops.varlen_cross_attention` for a
        cross-attention sublayer): ``queries`` and ``keys_values`` are then rows (T, H, D) and the table holds the
        masking (``key_padding_mask`` unused)."""
        dropout_p = self.dropout_p if self.training else 0.0
        if sequences is not None:
            q = self.self.query(x).unflatten(-1, (self.self.num_heads, -1)) if queries is None else queries
            k, v = keys_values
            if self.cross:
                out = ops.varlen_cross_attention(q, k, v, sequences, dropout_p)
            else:
                out = ops.varlen_attention(q, k, v, sequences, causal, dropout_p)
            return self.output(out.flatten(1), x)
        q = self.self.heads(self.self.query(x), packing) if queries is None else queries
        if isinstance(keys_values, BlockContext):
            out = keys_values.attend(q, dropout_p)
        else:
            k, v = keys_values
            out = ops.attention(q, k, v, key_padding_mask, causal, dropout_p)
        batch, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, length, -1)
        if packing is not None:
            out = packing.pack(out)
        return self.output(out, x)

    def attend_self(self, x, padding_mask, causal, packing: PackedText | None = None,
                    sequences: AttentionSequences | None = None, cache: KVCache | None = None, index: int = 0
                    ) -> torch.Tensor:
        """The self-attention sublayer on ``x`` (B, L, hidden), or packed (T, hidden) with its ``packing``;
        ``sequences``: its packed rows attend where they are (a self-attention table of :class:`PackedAttention`);
        ``cache`` and ``index`` (this layer's entry) only when decoding."""
        if sequences is not None:
            q, k, v = self.self.packed_queries_keys_values(x)
            return self(x, None, causal, (k, v), packing, queries=q, sequences=sequences)
        q, k, v = self.self.queries_keys_values(x, packing)
        if cache is not None:  # append this step's keys/values
            past = cache.self_kv[index]
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            cache.self_kv[index] = (k, v)
            causal = causal and k.shape[2] == x.shape[1]  # one new query sees every cached key
        # Packed captions are right-padded (PackedText.from_mask checks it), so under causal masking no real token
        # sees a padding key: the padding mask would only shape rows that are never read, and without it SDPA takes
        # its unmasked causal kernels (cuDNN 253 against 269 us for the masked memory-efficient one at B96 L35,
        # docs/benchmarks.md).
        self_mask = None if causal and packing is not None and cache is None else padding_mask
        return self(x, self_mask, causal, (k, v), packing, queries=q)


class SelfAttentionRows(NamedTuple):
    """Rows of a joint layer call (:meth:`TextLayer.forward`'s ``groups``, :func:`joint_text_passes`) that
    attend among themselves with their own self-attention sublayer, as the text pass they belong to would."""

    attention: TextAttention
    padding_mask: torch.Tensor
    """(B, L) of the pass's captions."""
    causal: bool
    packing: PackedText | None
    sequences: AttentionSequences | None
    """Their self-attention table when the joint call attends packed (:class:`PackedAttention`), else None."""

    @property
    def rows(self) -> int:
        """Rows of ``x`` they take: packed tokens, or captions (a tensor's size, so symbolic under compile)."""
        return self.padding_mask.shape[0] if self.packing is None else self.packing.tokens


class TextLayer(nn.Module):
    def __init__(self, config: TextConfig, encoder_width: int | None):
        super().__init__()
        self.attention = TextAttention(config, config.hidden_size)
        if encoder_width is not None:
            self.crossattention = TextAttention(config, encoder_width, cross=True)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output = AttentionOutput(config)
        self.output.dense = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x, padding_mask, causal, context_kv=None, context_mask=None, cache=None, index=0,
                packing: PackedText | None = None, plan: PackedAttention | None = None,
                groups: tuple[SelfAttentionRows, ...] | None = None):
        """``context_kv``: this layer's cross-attention keys/values (B, H, N, D) or :class:`BlockContext`,
        or None for no cross-attention; ``cache`` and ``index`` (this layer's entry) only when decoding;
        ``packing``: ``x`` is packed (T, hidden), see :class:`~blip_fast.models.packing.PackedText`; ``plan``: its
        rows attend packed, see :class:`PackedAttention`.

        ``groups``: ``x`` holds the rows of several text passes, one after the other, each self-attending with its
        own sublayer (:class:`SelfAttentionRows`; ``padding_mask``, ``causal`` and the plan's self-attention table
        then unused); the cross-attention and feed-forward, which the passes share, take all rows at once
        (:func:`joint_text_passes`)."""
        if groups is None:
            x = self.attention.attend_self(x, padding_mask, causal, packing,
                                           None if plan is None else plan.self_attention, cache, index)
        else:
            x = torch.cat([group.attention.attend_self(rows, group.padding_mask, group.causal, group.packing,
                                                       group.sequences)
                           for group, rows in zip(groups, x.split([group.rows for group in groups]), strict=True)])
        if context_kv is not None:
            if plan is not None and plan.cross_attention is not None:
                x = self.crossattention(x, None, False, _packed_context(context_kv), packing,
                                        sequences=plan.cross_attention)
            else:
                x = self.crossattention(x, context_mask, False, context_kv, packing)
        hidden = F.gelu(self.intermediate.dense(x))
        return self.output(hidden, x)


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
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L); got {tuple(input_ids.shape)}")
        if encoder_hidden_states is not None and context_kv is not None:
            raise ValueError("give the context as encoder_hidden_states or as context_kv, not both")
        has_context = encoder_hidden_states is not None or context_kv is not None
        if has_context and not hasattr(self.encoder.layer[0], "crossattention"):
            raise ValueError("this text transformer has no cross-attention layers")
        if context_kv is not None and len(context_kv) != len(self.encoder.layer):
            raise ValueError(f"context_kv has {len(context_kv)} entries for {len(self.encoder.layer)} layers")
        if context_kv is not None and isinstance(context_kv[0], BlockContext) and (
                encoder_attention_mask is not None or cache is not None):
            raise ValueError("a BlockContext takes no encoder_attention_mask and no cache")
        if packing is not None and (cache is not None or attention_mask is None
                                    or packing.inverse.shape != input_ids.shape):
            raise ValueError(f"packing needs the attention mask of its {tuple(packing.inverse.shape)} captions "
                             f"(input_ids {tuple(input_ids.shape)}) and no cache")
        if has_context and cache is not None and cache.cross_kv and cache.cross_kv[0] is not None:
            context_kv = cache.cross_kv  # a later decoding step: the first step's (beam-reordered) entries
        else:
            if encoder_hidden_states is not None:
                context_kv = self.context_keys_values(encoder_hidden_states)
            if cache is not None and context_kv is not None:
                cache.cross_kv = list(context_kv)
        past = cache.length if cache is not None else 0
        x = self.embeddings(input_ids, past, packing)
        padding_mask = None if attention_mask is None else attention_mask.bool()
        context_mask = None if encoder_attention_mask is None else encoder_attention_mask.bool()
        plan = None
        if packing is not None:
            plan = PackedAttention.plan(packing, padding_mask, causal, context_kv, context_mask, like=x)
        for index, layer in enumerate(self.encoder.layer):
            layer_kv = None if context_kv is None else context_kv[index]
            x = layer(x, padding_mask, causal, layer_kv, context_mask, cache, index, packing, plan)
        return x


class TextPass(NamedTuple):
    """One text pass of :func:`joint_text_passes`: what ``transformer(input_ids, attention_mask, causal=causal,
    packing=packing, context_kv=...)`` computes."""

    transformer: TextTransformer
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    causal: bool
    packing: PackedText | None


def joint_text_passes(passes: Sequence[TextPass], context_kv: list) -> list[torch.Tensor]:
    """The last hidden states of text passes over transformers that share all but their self-attention
    (pretraining's image-grounded encoder and decoder, :func:`share_all_but_self_attention`), computed layer by
    layer together; per pass, what its :class:`TextPass` says.

    The rows of all passes go through the shared sublayers (embeddings, cross-attention, feed-forward) as one
    batch. Each shared weight then takes part in one GEMM per layer instead of one per pass and receives one
    gradient, where separate passes give it one each for autograd to add (a kernel per weight and extra pass), and
    each layer is one call of its compiled block. Rows are independent outside attention, and each pass's rows
    self-attend apart, so the results are those of separate passes up to the summation order of the weight
    gradients (and dropout draws its masks in another order).

    ``context_kv``: per layer the cross-attention context of all the passes' rows in order, a (k, v) pair or a
    :class:`BlockContext`. The passes' captions share one length and are all packed or all padded.
    """
    first = passes[0].transformer
    shared = all(other.transformer.embeddings is first.embeddings
                 and len(other.transformer.encoder.layer) == len(first.encoder.layer)
                 and all(_shares_all_but_self_attention(mine, theirs)
                         for mine, theirs in zip(first.encoder.layer, other.transformer.encoder.layer, strict=True))
                 for other in passes[1:])
    if not shared or not hasattr(first.encoder.layer[0], "crossattention"):
        raise ValueError("joint text passes need transformers with cross-attention that share all but their "
                         "self-attention")
    if len(context_kv) != len(first.encoder.layer):
        raise ValueError(f"context_kv has {len(context_kv)} entries for {len(first.encoder.layer)} layers")
    lengths = {p.input_ids.shape[1] for p in passes}
    if len(lengths) != 1 or len({p.packing is None for p in passes}) != 1:
        raise ValueError(f"joint text passes need captions of one length (got {sorted(lengths)}), all packed or all "
                         "padded")
    for p in passes:
        if p.attention_mask.shape != p.input_ids.shape or (
                p.packing is not None and p.packing.inverse.shape != p.input_ids.shape):
            raise ValueError(f"input_ids {tuple(p.input_ids.shape)} need an attention mask and a packing of their "
                             "shape")
    masks = [p.attention_mask.bool() for p in passes]
    padding_mask = torch.cat(masks)
    packing = None if passes[0].packing is None else PackedText.concat([p.packing for p in passes])
    x = first.embeddings(torch.cat([p.input_ids for p in passes]), 0, packing)
    # packed attention: each pass's self-attention table, and one cross-attention table over all rows (the plan's
    # self-attention slot stays empty: the groups carry theirs)
    cross = None
    if packing is not None and ops.packed_attention_on(x, cross=True):
        cross = PackedAttention.cross_attention_table(packing, context_kv, None)
    plan = None if cross is None else PackedAttention(None, cross)
    packed_self = packing is not None and ops.packed_attention_on(x)
    tables = [PackedAttention.self_attention_table(p.packing, mask, p.causal) if packed_self else None
              for p, mask in zip(passes, masks, strict=True)]
    for index, layers in enumerate(zip(*(p.transformer.encoder.layer for p in passes), strict=True)):
        groups = tuple(SelfAttentionRows(layer.attention, mask, p.causal, p.packing, table)
                       for layer, p, mask, table in zip(layers, passes, masks, tables, strict=True))
        x = layers[0](x, padding_mask, False, context_kv[index], None, None, index, packing, plan, groups)
    return list(x.split([group.rows for group in groups]))


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


def _shares_all_but_self_attention(layer: TextLayer, other: TextLayer) -> bool:
    return all(getattr(layer, name, None) is getattr(other, name, False)
               for name in ("crossattention", "intermediate", "output"))


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
