"""Captions without their padding: the real tokens of a padded batch laid end to end.

A batch of captions is padded to its longest one, and every padded position costs what a real token
costs in each linear layer, LayerNorm, GELU and dropout of the text transformer. Only attention needs
the (B, L) layout, to know which tokens share a caption. So the text transformer can carry its
hidden states packed, (T, hidden) for the T real tokens, and unpack them into (B, L) only around
attention (blip_fast.models.fast_passes). Every packed row is computed exactly as in the padded layout:
rows are independent outside attention, and attention sees the same keys, queries and padding mask
(causal attention needs no padding mask at all over right-padded captions, see fast_passes.FastRows).
With BLIP's synthetic captions a batch of 96 is ~70% real tokens; with web captions truncated to 30
tokens (most around 15), ~50%.

The packing is computed on the host from the attention mask the tokenizer made there
(:meth:`PackedText.from_mask`), before the batch goes to the device: nothing in the step waits for
the GPU to count tokens. For a captured CUDA graph the token count is a shape, so it can be rounded up
to a multiple (``multiple``) with *filler* rows, so that fewer distinct shapes (graphs) arise. Filler
rows copy the last token of a caption; nothing reads them back, and their next-token target is the
padding after that token, which the LM loss ignores.

Padded positions unpack to a copy of some real row: keys there are masked, and the outputs of
queries there are dropped when packing again, so their values never matter, and their gradients are
exact zeros. Nothing reads a filler row back either, so its gradient is an exact zero too. That is
why packing and unpacking can both take their gradients with a gather (:class:`_GatherRows`) rather
than autograd's scatter-add: each real row or position takes the gradient of its one counterpart, and
the rows whose gradient is zero are zeroed, instead of being summed into a zeroed buffer with atomic
adds. The result is the same, is deterministic, and reads and writes less.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..ops import IGNORE_INDEX


class PackedText(NamedTuple):
    """Where the T packed tokens of a (B, L) caption batch live: index tensors long, masks bool, on one device."""

    index: torch.Tensor
    """(T,) flat position ``b * L + t`` of each packed token: every caption's tokens in order, then filler."""
    inverse: torch.Tensor
    """(B, L) packed row of each padded position (a padding position: some real token's row)."""
    first: torch.Tensor
    """(B,) packed row of each caption's first token ([CLS] / [ENC] / [DEC])."""
    positions: torch.Tensor
    """(T,) position of each packed token in its caption (the position embedding's index)."""
    real: torch.Tensor
    """(T,) bool: the packed row is a caption's token (False: filler)."""
    valid: torch.Tensor
    """(B, L) bool: the padded position holds a token (False: padding)."""

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor, multiple: int = 1) -> PackedText:
        """The packing of right-padded captions (``attention_mask`` (B, L), 1 on real tokens), with the token
        count rounded up to ``multiple``. Reads the mask on the host: give it the CPU copy."""
        if attention_mask.dim() != 2 or attention_mask.shape[1] == 0:
            raise ValueError(f"attention_mask must be (B, L) with L > 0; got {tuple(attention_mask.shape)}")
        if multiple < 1:
            raise ValueError(f"multiple must be at least 1; got {multiple}")
        mask = attention_mask.detach().to("cpu", torch.bool)
        batch, length = mask.shape
        lengths = mask.sum(dim=1)
        if not torch.equal(mask, torch.arange(length)[None, :] < lengths[:, None]) or bool((lengths == 0).any()):
            raise ValueError("packing needs right-padded captions of at least one token each (the tokenizer's output)")
        real = torch.nonzero(mask.flatten()).squeeze(1)
        tokens = real.numel()
        filler_count = -tokens % multiple
        last = torch.arange(batch) * length + lengths - 1
        index = torch.cat([real, last[torch.arange(filler_count) % batch]])
        inverse = torch.empty(batch * length, dtype=torch.long)
        inverse[real] = torch.arange(tokens)
        inverse[~mask.flatten()] = 0  # any real row: what a padding position holds is never read
        first = torch.cumsum(lengths, 0) - lengths
        return cls(index, inverse.view(batch, length), first, index % length, torch.arange(index.numel()) < tokens,
                   mask)

    @classmethod
    def dense(cls, batch: int, length: int, device: torch.device | str) -> PackedText:
        """Every position of a (batch, length) block as a token, padding included: for rows whose lengths the
        host does not know (pretraining's hard-negative texts, gathered on the device)."""
        flat = torch.arange(batch * length, device=device)
        return cls(flat, flat.view(batch, length), torch.arange(batch, device=device) * length,
                   torch.arange(length, device=device).repeat(batch),
                   torch.ones(batch * length, dtype=torch.bool, device=device),
                   torch.ones(batch, length, dtype=torch.bool, device=device))

    @classmethod
    def concat(cls, parts: list[PackedText]) -> PackedText:
        """The packing of the row-wise concatenation of batches of one length L, tokens in the parts' order."""
        length = parts[0].length
        if any(part.length != length for part in parts):
            raise ValueError(f"packings of lengths {[part.length for part in parts]} cannot be concatenated")
        index, inverse, first = [], [], []
        rows = tokens = 0
        for part in parts:
            index.append(part.index + rows * length)
            inverse.append(part.inverse + tokens)
            first.append(part.first + tokens)
            rows += part.batch
            tokens += part.tokens
        return cls(torch.cat(index), torch.cat(inverse), torch.cat(first), torch.cat([p.positions for p in parts]),
                   torch.cat([p.real for p in parts]), torch.cat([p.valid for p in parts]))

    @property
    def batch(self) -> int:
        return self.inverse.shape[0]

    @property
    def length(self) -> int:
        return self.inverse.shape[1]

    @property
    def tokens(self) -> int:
        """Packed rows T, filler included."""
        return self.index.shape[0]

    def to(self, device, non_blocking: bool = False) -> PackedText:
        return PackedText(*(t.to(device, non_blocking=non_blocking) for t in self))

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (T, ...). Its gradient leaves padding positions at zero (see the module docstring)."""
        return _GatherRows.apply(padded.flatten(0, 1), self.index, self.inverse.flatten(), self.valid.flatten())

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, L, ...); a padding position holds a copy of some real row. Its gradient leaves filler
        rows at zero (see the module docstring)."""
        padded = _GatherRows.apply(packed, self.inverse.flatten(), self.index, self.real)
        return padded.view(*self.inverse.shape, *packed.shape[1:])

    def first_rows(self, packed: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, ...): each caption's first token."""
        return packed.index_select(0, self.first)

    def next_token_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """(B, L) targets -> (T,): the target of the token after each packed token, ``IGNORE_INDEX`` after a
        caption's last token (the padding's target, or past the end) and so for filler rows."""
        ignore = targets.new_full((targets.shape[0], 1), IGNORE_INDEX)
        return self.pack(torch.cat([targets[:, 1:], ignore], dim=1))


class _GatherRows(torch.autograd.Function):
    """``source.index_select(0, index)``, whose gradient is gathered back: ``grad.index_select(0, grad_index)``,
    zero where ``grad_keep`` is False.

    Right where ``index`` and ``grad_index`` are inverse to each other on the kept rows, and every row of ``source``
    not kept has, exactly, no gradient to receive (packing and unpacking, see the module docstring).
    """

    @staticmethod
    def forward(ctx, source, index, grad_index, grad_keep):
        ctx.save_for_backward(grad_index, grad_keep)
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        grad_index, grad_keep = ctx.saved_tensors
        keep = grad_keep.view(-1, *([1] * (grad.dim() - 1)))
        return torch.where(keep, grad.index_select(0, grad_index), 0), None, None, None
