"""Fast text passes of the MED transformer: the same layers (blip_fast.models.med), other ways to attend.

The plain model attends on padded (B, L) rows, each row to its own context row. What follows computes the same
states with less work, by handing each :class:`~blip_fast.models.med.TextLayer` another per-layer context object
(the interface of :class:`~blip_fast.models.med.PaddedRows`: ``grounded``, ``attend_self(attention, x)``,
``attend_context(crossattention, x)``):

* **packed rows** (:class:`FastRows` with a :class:`~blip_fast.models.packing.PackedText`): the hidden states
  travel as (T, hidden) for the T real tokens, so no linear layer, LayerNorm, GELU or dropout computes padding;
  they are unpacked to (B, L) only around attention. Pretraining's fast path runs its text passes that way.
* **packed attention** (:class:`PackedAttention`, where the packed attention kernel is the selected backend,
  opt-in): attention too reads the packed rows and is not unpacked: self-attention with
  :func:`~blip_fast.ops.varlen_attention`, cross-attention with :func:`~blip_fast.ops.varlen_cross_attention`,
  each chosen on its own.
* **shared context rows** (:class:`BlockContext`): rows that attend to the same image keys/values (pretraining's
  positive and negative-text ITM rows, retrieval's k texts per image) attend in blocks stacked along the
  sequence, so those keys/values are neither copied nor read more than once.
* **joint passes** (:func:`joint_text_passes`, :class:`JointRows`): passes over transformers that share all but
  their self-attention (pretraining's ITM encoder and LM decoder) run layer by layer together, the rows of both
  through each shared weight at once.

Each gives the states of the plain padded pass up to the summation order of floating-point sums (and dropout's
draws, for joint passes); tests/models/test_packing.py, test_joint_text_passes.py and
tests/kernels/test_packed_attention_model.py check it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from blip_fast.kernels.varlen_attention import MAX_TILE as VARLEN_MAX_TILE

from .. import ops
from ..ops import AttentionSequences
from .packing import PackedText

if TYPE_CHECKING:
    from .med import TextAttention, TextEmbeddings, TextLayer, TextTransformer


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


def queries_keys_values(attention: TextAttention, x: torch.Tensor, packing: PackedText | None
                        ) -> tuple[torch.Tensor, ...]:
    """Self-attention's (q, k, v), each (B, H, L, D), of ``x`` (B, L, hidden), or packed (T, hidden) with its
    ``packing``: the one GEMM's output unpacked once instead of three times."""
    projections = attention.self
    qkv = projections.stacked(x)
    if packing is not None:
        qkv = packing.unpack(qkv)
    return tuple(projections.heads(t) for t in qkv.split(projections.query.out_features, dim=-1))


class FastRows(NamedTuple):
    """How the rows of one text pass attend in one layer, where they are packed (``packing``), attend on their
    packed rows (a table of :class:`PackedAttention`), or cross-attend to a :class:`BlockContext`; the per-layer
    context of :class:`~blip_fast.models.med.TextLayer`, as :class:`~blip_fast.models.med.PaddedRows`."""

    padding_mask: torch.Tensor
    """(B, L) of the pass's captions."""
    causal: bool
    packing: PackedText | None
    """``x`` is packed (T, hidden), see :class:`~blip_fast.models.packing.PackedText`; None: padded (B, L, hidden)."""
    self_sequences: AttentionSequences | None
    """Self-attention's table where it attends packed, else None."""
    context: tuple[torch.Tensor, torch.Tensor] | BlockContext | None
    """This layer's cross-attention keys/values (B, H, N, D) or :class:`BlockContext`; None: no cross-attention."""
    context_mask: torch.Tensor | None
    cross_sequences: AttentionSequences | None
    """Cross-attention's table where it attends packed, else None."""

    @property
    def grounded(self) -> bool:
        return self.context is not None

    @property
    def row_count(self) -> int:
        """Rows of ``x``: packed tokens, or captions (a tensor's size, so symbolic under compile)."""
        return self.padding_mask.shape[0] if self.packing is None else self.packing.tokens

    def attend_self(self, attention: TextAttention, x: torch.Tensor) -> torch.Tensor:
        dropout_p = attention.dropout_p_now
        if self.self_sequences is not None:
            projections = attention.self
            q, k, v = projections.stacked(x).unflatten(-1, (3, projections.num_heads, -1)).unbind(-3)
            out = ops.varlen_attention(q, k, v, self.self_sequences, self.causal, dropout_p)
            return attention.output(out.flatten(1), x)
        q, k, v = queries_keys_values(attention, x, self.packing)
        # Packed captions are right-padded (PackedText.from_mask checks it), so under causal masking no real token
        # sees a padding key: the padding mask would only shape rows that are never read, and without it SDPA takes
        # its unmasked causal kernels (cuDNN 253 against 269 us for the masked memory-efficient one at B96 L35,
        # docs/benchmarks.md).
        mask = None if self.causal and self.packing is not None else self.padding_mask
        return self._output(attention, ops.attention(q, k, v, mask, self.causal, dropout_p), x)

    def attend_context(self, crossattention: TextAttention, x: torch.Tensor) -> torch.Tensor:
        projections, dropout_p = crossattention.self, crossattention.dropout_p_now
        if self.cross_sequences is not None:
            q = projections.query(x).unflatten(-1, (projections.num_heads, -1))
            k, v = _packed_context(self.context)
            out = ops.varlen_cross_attention(q, k, v, self.cross_sequences, dropout_p)
            return crossattention.output(out.flatten(1), x)
        q = projections.query(x)
        q = projections.heads(q if self.packing is None else self.packing.unpack(q))
        if isinstance(self.context, BlockContext):
            out = self.context.attend(q, dropout_p)
        else:
            out = ops.attention(q, *self.context, self.context_mask, False, dropout_p)
        return self._output(crossattention, out, x)

    def _output(self, attention: TextAttention, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The output sublayer on attention's ``out`` (B, H, L, D), packed again where ``x`` is."""
        out = out.transpose(1, 2).flatten(2)  # (B, L, hidden)
        if self.packing is not None:
            out = self.packing.pack(out)
        return attention.output(out, x)


class SelfAttentionRows(NamedTuple):
    """Rows of a joint layer call (:class:`JointRows`) that attend among themselves with their own self-attention
    sublayer, as the text pass they belong to would."""

    attention: TextAttention
    rows: FastRows
    """How they self-attend (no context: the joint call's cross-attention takes all rows at once)."""


class JointSelfAttention(NamedTuple):
    """The self-attention of every group of a :class:`JointRows` in one packed-attention launch: one table over all
    their rows, and whether each sequence is causal (ITM's bidirectional, LM's causal)."""

    sequences: AttentionSequences
    causal: torch.Tensor
    """(S,) bool."""


class JointRows(NamedTuple):
    """One layer's context for the rows of several text passes, one after the other (:func:`joint_text_passes`):
    each pass self-attends with its own sublayer; the cross-attention, which the passes share, takes all rows."""

    groups: tuple[SelfAttentionRows, ...]
    shared: FastRows
    """The cross-attention of all rows."""
    joint_self: JointSelfAttention | None = None
    """Where set, the groups' attentions run as one kernel launch (each group still projects with its own weights)."""

    @property
    def grounded(self) -> bool:
        """Always: joint passes are the image-grounded ones (:func:`joint_text_passes` checks for cross-attention)."""
        return True

    def attend_self(self, attention: TextAttention, x: torch.Tensor) -> torch.Tensor:
        """Each group with its own sublayer (``attention``, the called layer's, is the first group's)."""
        parts = x.split([group.rows.row_count for group in self.groups])
        dropout = {group.attention.dropout_p_now for group in self.groups}
        if self.joint_self is not None and len(dropout) == 1:
            return self._attend_self_joint(parts, dropout.pop())
        return torch.cat([group.rows.attend_self(group.attention, part)
                          for group, part in zip(self.groups, parts, strict=True)])

    def _attend_self_joint(self, parts: Sequence[torch.Tensor], dropout_p: float) -> torch.Tensor:
        """Each group's q, k, v from its own projection, attended in one launch (per-sequence causal), each group's
        output sublayer on its rows."""
        projections = [group.attention.self for group in self.groups]
        qkv = torch.cat([p.stacked(part) for p, part in zip(projections, parts, strict=True)])
        q, k, v = qkv.unflatten(-1, (3, projections[0].num_heads, -1)).unbind(-3)
        out = ops.varlen_attention(q, k, v, self.joint_self.sequences, self.joint_self.causal, dropout_p)
        outs = out.flatten(1).split([part.shape[0] for part in parts])
        return torch.cat([group.attention.output(o, part)
                          for group, o, part in zip(self.groups, outs, parts, strict=True)])

    def attend_context(self, crossattention: TextAttention, x: torch.Tensor) -> torch.Tensor:
        return self.shared.attend_context(crossattention, x)


def embed(embeddings: TextEmbeddings, input_ids: torch.Tensor, packing: PackedText | None) -> torch.Tensor:
    """(B, L) ids -> (B, L, hidden); with ``packing``, (T, hidden) for its packed tokens."""
    if packing is None:
        return embeddings(input_ids)
    embeddings.check_length(input_ids.shape[1])
    return embeddings.tokens(packing.pack(input_ids), packing.positions)


def fast_text_pass(transformer: TextTransformer, input_ids: torch.Tensor, padding_mask: torch.Tensor | None,
                   causal: bool, context_kv: list | None, context_mask: torch.Tensor | None,
                   packing: PackedText | None) -> torch.Tensor:
    """:meth:`TextTransformer.forward <blip_fast.models.med.TextTransformer.forward>` over packed captions
    (``packing``) or to a context of :class:`BlockContext` s (``context_kv``), without a cache."""
    if context_kv is not None and isinstance(context_kv[0], BlockContext) and context_mask is not None:
        raise ValueError("a BlockContext takes no encoder_attention_mask")
    if packing is not None and (padding_mask is None or packing.inverse.shape != input_ids.shape):
        raise ValueError(f"packing needs the attention mask of its {tuple(packing.inverse.shape)} captions "
                         f"(input_ids {tuple(input_ids.shape)})")
    x = embed(transformer.embeddings, input_ids, packing)
    plan = None
    if packing is not None:
        plan = PackedAttention.plan(packing, padding_mask, causal, context_kv, context_mask, like=x)
    self_sequences, cross_sequences = (None, None) if plan is None else plan
    for index, layer in enumerate(transformer.encoder.layer):
        context = None if context_kv is None else context_kv[index]
        x = layer(x, FastRows(padding_mask, causal, packing, self_sequences, context, context_mask, cross_sequences))
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
    (pretraining's image-grounded encoder and decoder, :func:`~blip_fast.models.med.share_all_but_self_attention`),
    computed layer by layer together; per pass, what its :class:`TextPass` says.

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
    packing = None if passes[0].packing is None else PackedText.concat([p.packing for p in passes])
    x = embed(first.embeddings, torch.cat([p.input_ids for p in passes]), packing)
    # packed attention: each pass's self-attention table, and one cross-attention table over all rows
    cross = None
    if packing is not None and ops.packed_attention_on(x, cross=True):
        cross = PackedAttention.cross_attention_table(packing, context_kv, None)
    packed_self = packing is not None and ops.packed_attention_on(x)
    rows = [FastRows(mask, p.causal, p.packing,
                     PackedAttention.self_attention_table(p.packing, mask, p.causal) if packed_self else None,
                     None, None, None)
            for p, mask in zip(passes, masks, strict=True)]
    all_rows = FastRows(torch.cat(masks), False, packing, None, None, None, cross)
    joint_self = _joint_self_attention(rows) if packed_self else None
    for index, layers in enumerate(zip(*(p.transformer.encoder.layer for p in passes), strict=True)):
        groups = tuple(SelfAttentionRows(layer.attention, group) for layer, group in zip(layers, rows, strict=True))
        x = layers[0](x, JointRows(groups, all_rows._replace(context=context_kv[index]), joint_self))
    return list(x.split([group.row_count for group in rows]))


def _joint_self_attention(rows: Sequence[FastRows]) -> JointSelfAttention | None:
    """One table and per-sequence modes over the passes' packed self-attention tables, where the kernel takes
    per-sequence modes: every sequence within one tile (the single-tile kernels), else None."""
    tables = [r.self_sequences for r in rows]
    if max(max(t.max_q_len, t.max_kv_len) for t in tables) > VARLEN_MAX_TILE:
        return None
    causal = torch.cat([torch.full(t.q_len.shape, r.causal, dtype=torch.bool, device=t.q_len.device)
                        for r, t in zip(rows, tables, strict=True)])
    return JointSelfAttention(AttentionSequences.concat(tables, [r.row_count for r in rows]), causal)


def _shares_all_but_self_attention(layer: TextLayer, other: TextLayer) -> bool:
    return all(getattr(layer, name, None) is getattr(other, name, False)
               for name in ("crossattention", "intermediate", "output"))
