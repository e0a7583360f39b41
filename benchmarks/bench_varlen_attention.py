"""Benchmark of text attention over packed captions: the packed attention kernel against unpacking around SDPA.

Pretraining's text passes carry packed captions (T, 768). Each attention either

* ``padded`` -- unpacks its queries/keys/values into (B, L), runs torch's SDPA (the memory-efficient kernel
  first where there is a padding mask, ``blip_fast.ops.attention``) and packs the output: what ``auto`` runs; or
* ``fast``   -- attends on the packed rows with the Triton kernels of ``blip_fast.kernels.varlen_attention``
  (``BLIP_FAST_IMPL=auto,varlen_attention=triton,varlen_cross_attention=triton``): the single-tile kernels where
  every caption fits 64 rows (text), the blocked ones elsewhere (ITM's 197 image keys); ``fast_blocked`` the
  blocked ones for text too.

Peers, where they run: ``padded_<backend>`` is ``padded`` with SDPA forced to one backend (flash, efficient, cudnn,
math); on text, ``flash_attn_varlen`` (flash-attn's ``flash_attn_varlen_func`` on the packed rows) and ``xformers``
(``memory_efficient_attention`` with a block-diagonal bias) when importable. A peer that is not installed, or
refuses the case (flash SDPA takes no padding mask), is reported as skipped with its reason; only our own
implementations must run.

Both run forward + backward in bf16 with dropout 0.1, as in training, at BLIP-base shapes (12 heads of 64) on
the captions of a pretraining batch (96 of 8 to 35 tokens): the unimodal encoder's self-attention, the decoder's
causal self-attention, and ITM's cross-attention of its 3 x 96 rows to the 197 tokens of their images (the
negative-image rows picking theirs). Before timing, outputs without dropout are compared (2e-2 relative).

    python benchmarks/bench_varlen_attention.py [--blocks 32x32,64x64,...] [--json PATH]

with PATH like ``benchmarks/results/kernels-h100-YYYYMMDD-attention.json``. Times are medians of
``triton.testing.do_bench`` in microseconds; ``fast_blocked`` runs the blocked kernels' default blocks (``BLOCKS``:
32 x 64, causal 32 x 32), and ``fast_mM_nN`` the other blocks asked for: the data to tune them with. Needs a CUDA
device.
"""

from __future__ import annotations

import argparse
import sys

import torch

from blip_fast import ops
from blip_fast.shapes import BASE_HEADS, FINETUNE_TEXT_LENGTH, HEAD_DIM, IMAGE_TOKENS_224, PRETRAIN_BATCH

from results_file import benchmark_arguments, run_gpu_benchmark

# both packed attention ops on the kernel: self-attention (bidirectional, causal) and cross-attention
PACKED_KERNEL = "auto,varlen_attention=triton,varlen_cross_attention=triton"

HEADS, DIM, BATCH, IMAGE_TOKENS = BASE_HEADS, HEAD_DIM, PRETRAIN_BATCH, IMAGE_TOKENS_224
TEXT_LENGTH, DROPOUT = FINETUNE_TEXT_LENGTH, 0.1


def caption_mask(rows: int, generator: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(8, TEXT_LENGTH + 1, (rows,), generator=generator)
    return torch.arange(TEXT_LENGTH)[None, :] < lengths[:, None]


def cases():
    """(name, padded fn, packed fn, leaves): each fn maps the leaves to the attention's packed output."""
    from blip_fast.models.med import BlockContext, PackedAttention
    from blip_fast.models.packing import PackedText

    generator = torch.Generator().manual_seed(0)
    mask = caption_mask(BATCH, generator)
    packing = PackedText.from_mask(mask).to("cuda")
    mask = mask.cuda()

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 0.5).to("cuda", torch.bfloat16).requires_grad_()

    def heads(t):
        return t.view(*t.shape[:-1], HEADS, DIM).transpose(-3, -2)

    lengths = mask.sum(dim=1)
    for causal in (False, True):
        qkv = rand(packing.tokens, 3 * HEADS * DIM)
        plan = PackedAttention.plan(packing, mask, causal, None, None, like=qkv)

        def padded(qkv, dropout_p, causal=causal):
            q, k, v = (heads(t) for t in packing.unpack(qkv).split(HEADS * DIM, dim=-1))
            out = ops.attention(q, k, v, None if causal else mask, causal, dropout_p)
            return packing.pack(out.transpose(1, 2).flatten(2))

        def packed(qkv, dropout_p, causal=causal, plan=plan):
            q, k, v = qkv.unflatten(-1, (3, HEADS, DIM)).unbind(-3)
            return ops.varlen_attention(q, k, v, plan.self_attention, causal, dropout_p).flatten(1)

        peers = {**forced_sdpa(padded), **varlen_peers(lengths, packing.tokens, causal)}
        yield f"text_{'causal' if causal else 'bidirectional'}_b{BATCH}_t{packing.tokens}", padded, packed, [qkv], peers

    # ITM: B positive rows, B rows of drawn negative texts (padding kept: their lengths live on the device), B rows
    # of negative images
    itm = PackedText.concat([packing, PackedText.dense(BATCH, TEXT_LENGTH, "cuda"), packing])
    itm_mask = torch.cat([mask, mask[torch.randperm(BATCH, device="cuda")], mask])
    neg_image = torch.randint(0, BATCH, (BATCH,), generator=generator).cuda()
    queries, keys, values = rand(itm.tokens, HEADS * DIM), rand(BATCH, IMAGE_TOKENS, HEADS * DIM), \
        rand(BATCH, IMAGE_TOKENS, HEADS * DIM)

    def context(keys, values):  # one view of each: the packed plan reads segments that share their keys tensor
        keys, values = heads(keys), heads(values)
        return BlockContext(((keys, values, 2, None), (keys, values, 1, neg_image)))

    def itm_padded(queries, keys, values, dropout_p):
        out = context(keys, values).attend(heads(itm.unpack(queries)), dropout_p)
        return itm.pack(out.transpose(1, 2).flatten(2))

    # the model plans once per pass, for all its layers: so here once, outside the timed calls
    itm_plan = PackedAttention.plan(itm, itm_mask, False, [context(keys, values)], None, like=queries)

    def itm_packed(queries, keys, values, dropout_p):
        keys_rows, values_rows = (t.flatten(0, 1).unflatten(-1, (HEADS, DIM)) for t in (keys, values))
        return ops.varlen_attention(queries.unflatten(-1, (HEADS, DIM)), keys_rows, values_rows,
                                    itm_plan.cross_attention, False, dropout_p).flatten(1)

    yield (f"itm_cross_b{3 * BATCH}_t{itm.tokens}_n{IMAGE_TOKENS}", itm_padded, itm_packed, [queries, keys, values],
           forced_sdpa(itm_padded))


def forced_sdpa(padded):
    """``padded`` with SDPA restricted to each of its backends."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forced(backend):
        def fn(*args):
            with sdpa_kernel([backend]):
                return padded(*args)
        return fn

    return {f"padded_{name}": forced(backend) for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH))}


def varlen_peers(lengths: torch.Tensor, tokens: int, causal: bool) -> dict:
    """flash-attn's and xformers' variable-length attention on the packed (qkv) rows, those importable: captions end
    to end, then filler rows (zero here, as in the kernels)."""
    peers = {}
    real = int(lengths.sum())
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to("cuda", torch.int32)
    longest = int(lengths.max())

    def split(qkv):
        return qkv[:real].unflatten(-1, (3, HEADS, DIM)).unbind(-3)

    def with_filler(out):
        return torch.nn.functional.pad(out.flatten(1), (0, 0, 0, tokens - real))

    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as error:
        print(f"flash_attn_varlen: skipped, {error}")
    else:
        def flash(qkv, dropout_p):
            q, k, v = split(qkv)
            return with_filler(flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, longest, longest, dropout_p,
                                                      causal=causal))
        peers["flash_attn_varlen"] = flash
    try:
        from xformers.ops import fmha
    except ImportError as error:
        print(f"xformers: skipped, {error}")
    else:
        bias_type = fmha.attn_bias.BlockDiagonalCausalMask if causal else fmha.attn_bias.BlockDiagonalMask
        bias = bias_type.from_seqlens(lengths.tolist())

        def xformers(qkv, dropout_p):
            q, k, v = (t.unsqueeze(0) for t in split(qkv))
            return with_filler(fmha.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p)[0])
        peers["xformers"] = xformers
    return peers


def run(blocks: list[tuple[int, int]]) -> list[dict]:
    """Times per case: ``padded``, ``fast`` (single-tile where it fits), ``fast_blocked`` (the blocked kernels'
    default blocks), ``fast_mM_nN`` (other blocks) and the peers that run."""
    from blip_fast.kernels import varlen_attention as kernel

    default, max_tile = dict(kernel.BLOCKS), kernel.MAX_TILE
    records = []
    try:
        for case, padded, packed, leaves, peers in cases():
            timed = [("padded", padded, "auto", default, max_tile), ("fast", packed, PACKED_KERNEL, default, max_tile),
                     ("fast_blocked", packed, PACKED_KERNEL, default, 0)] + [
                (f"fast_m{m}_n{n}", packed, PACKED_KERNEL, {False: (m, n), True: (m, n)}, 0) for m, n in blocks]
            timed += [(name, fn, "auto", default, max_tile) for name, fn in peers.items()]
            records += time_case(case, leaves, timed, kernel, set(peers))
    finally:
        kernel.BLOCKS, kernel.MAX_TILE = default, max_tile
    return records


def time_case(case: str, leaves: list[torch.Tensor], timed: list, kernel, peers: set[str]) -> list[dict]:
    import triton.testing

    records = []
    want = timed[0][1](*leaves, 0.0)
    grad = torch.randn_like(want)
    for impl, fn, spec, blocks, max_tile in timed:
        # the kernels read their blocks and the single-tile bound at each call (MAX_TILE 0: always blocked)
        kernel.BLOCKS, kernel.MAX_TILE = blocks, max_tile
        try:
            with ops.impl_scope(spec):
                got = fn(*leaves, 0.0)
        except RuntimeError as error:  # a peer that refuses the case (flash SDPA with a padding mask)
            if impl not in peers:
                raise
            print(f"{case} {impl}: skipped, {str(error).splitlines()[0]}")
            continue
        error = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        if error > 2e-2:  # no timing for a wrong answer
            if impl in peers:
                print(f"{case} {impl}: skipped, relative error {error:.2e} against padded")
                continue
            raise RuntimeError(f"{impl} differs from the padded attention on {case}: relative error {error:.2e}")

        def step(fn=fn, spec=spec):
            with ops.impl_scope(spec):
                out = fn(*leaves, DROPOUT)
            return torch.autograd.grad(out, leaves, grad)

        try:
            median_ms = triton.testing.do_bench(step, return_mode="median")
        except RuntimeError as error:  # a peer without dropout or a backward for this case
            if impl not in peers:
                raise
            print(f"{case} {impl}: skipped, {str(error).splitlines()[0]}")
            continue
        records.append({"case": case, "impl": impl, "metric": "us", "value": round(median_ms * 1e3, 1)})
    return records


def parse_blocks(text: str) -> list[tuple[int, int]]:
    """``"64x64,32x64"`` -> [(64, 64), (32, 64)]: query x key rows per block, powers of two from 16."""
    blocks = []
    for item in filter(None, text.split(",")):
        m, _, n = item.partition("x")
        if not (m.isdigit() and n.isdigit()) or any(v < 16 or v & (v - 1) for v in (int(m), int(n))):
            raise argparse.ArgumentTypeError(f"blocks are MxN with powers of two from 16, e.g. 64x64; got {item!r}")
        blocks.append((int(m), int(n)))
    return blocks


def print_table(records: list[dict]) -> None:
    print(f"{'case':<40} {'impl':<18} {'us':>9} {'vs padded':>10}")
    times = {(r["case"], r["impl"]): r["value"] for r in records}
    for (case, impl), us in times.items():
        print(f"{case:<40} {impl:<18} {us:>9.1f} {times[(case, 'padded')] / us:>9.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_arguments(__doc__)
    parser.add_argument("--blocks", type=parse_blocks, default=parse_blocks("32x32,32x64,64x64,16x64"),
                        help="other query x key blocks to time the kernels with (default 32x32,32x64,64x64,16x64)")
    args = parser.parse_args(argv)
    return run_gpu_benchmark("varlen_attention", "kernels", argv, args.json, lambda: run(args.blocks), print_table)


if __name__ == "__main__":
    sys.exit(main())
