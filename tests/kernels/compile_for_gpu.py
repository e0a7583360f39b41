"""Compile every Triton kernel of blip_fast ahead of time for a CUDA architecture, in each dtype it takes.

    TRITON_INTERPRET=0 python tests/kernels/compile_for_gpu.py [ARCH]      # ARCH: 90 (H100, the default)

Needs no GPU: Triton lowers to PTX and assembles with the ptxas it ships. Prints one line per kernel and
dtype; a kernel that does not compile raises. Used by test_gpu_compile.py.
"""

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from blip_fast.kernels import (
    contrastive,
    decode_attention,
    hard_negatives,
    lm_loss,
    residual_layer_norm,
    varlen_attention,
)

# every module of blip_fast.kernels with Triton kernels
KERNEL_MODULES = (contrastive, decode_attention, hard_negatives, lm_loss, residual_layer_norm, varlen_attention)
DTYPES = ("bf16", "fp16", "fp32")
DEFAULT_STAGES = 3  # Triton's, for the launches that do not name theirs
# Shared memory one program may take on sm_90 (227 KB): a kernel past it compiles but cannot launch
SM90_SHARED_LIMIT = 232448


def specs():
    """(name, jit function, signature, constexprs, num_warps, num_stages) at BLIP's shapes."""
    for dtype in DTYPES:
        yield (f"hard_negatives {dtype}", hard_negatives._hard_negatives_kernel,
               {"sim_ptr": f"*{dtype}", "uniforms_ptr": "*fp32", "out_ptr": "*i64", "N": "i32",
                "stride_row": "i32", "stride_col": "i32", "BLOCK_N": "constexpr", "NUM_BLOCKS": "constexpr"},
               {"BLOCK_N": 128, "NUM_BLOCKS": 1}, 1, DEFAULT_STAGES)
        for write_grad in (True, False):
            yield (f"lm_loss {dtype} write_grad={write_grad}", lm_loss._smoothed_cross_entropy_kernel,
                   {"logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "loss_ptr": "*fp32", "scale_ptr": "*fp32",
                    "stride_row": "i32", "stride_scale": "i32", "V": "i32", "smoothing": "fp32",
                    "BLOCK_V": "constexpr", "NUM_BLOCKS": "constexpr", "WRITE_GRAD": "constexpr"},
                   {"BLOCK_V": lm_loss.MAX_BLOCK_V, "NUM_BLOCKS": 8, "WRITE_GRAD": write_grad}, 8, DEFAULT_STAGES)
        yield from varlen_attention_specs(dtype)
        yield from contrastive_specs(dtype)
        yield from decode_attention_specs(dtype)
        yield from residual_layer_norm_specs(dtype)


def contrastive_specs(dtype: str):
    """The ITC kernels at BLIP's batch 96, queue 57,600, embedding 256 (11 tiles per split on an H100), features in
    ``dtype`` and the queue in fp32, as the model keeps it; positives on the diagonal and by image id. The combine
    reads only fp32 statistics: once."""
    tiling = contrastive.DEFAULT_TILINGS[{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]]
    blocks = {"BLOCK_M": tiling.block_m, "BLOCK_N": tiling.block_n, "BLOCK_D": 256}
    inputs = {"q_ptr": f"*{dtype}", "q_m_ptr": f"*{dtype}", "keys_ptr": f"*{dtype}", "queue_ptr": "*fp32",
              "temp_ptr": "*fp32", "row_ids_ptr": "*i64", "key_ids_ptr": "*i64", "queue_ids_ptr": "*i64"}
    sizes = {"n_rows": "i32", "n_keys": "i32", "n_queue": "i32", "dim": "i32", "offset": "i32"}
    strides = {name: "i32" for name in ("stride_q", "stride_q_m", "stride_keys", "stride_queue_d", "stride_queue_n")}
    constexprs = {name: "constexpr" for name in ("HAS_IDS", "TILES_PER_SPLIT", "PRECISION", *blocks)}
    for has_ids in (False, True):
        values = {"HAS_IDS": has_ids, "TILES_PER_SPLIT": 11, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                  **blocks}
        yield (f"contrastive forward {dtype} ids={has_ids}", contrastive._itc_forward_kernel,
               {**inputs, "stats_ptr": "*fp32", "sim_ptr": "*fp32", **sizes, **strides, "stride_sim": "i32",
                "STATS": "constexpr", **constexprs}, {"STATS": contrastive.STATS, **values}, tiling.num_warps,
               tiling.num_stages)
        yield (f"contrastive gradients {dtype} ids={has_ids}", contrastive._itc_backward_kernel,
               {**inputs, "saved_ptr": "*fp32", "partial_ptr": "*fp32", **sizes, "alpha": "fp32", **strides,
                **constexprs}, values, tiling.num_warps, tiling.num_stages)
    if dtype == "fp32":
        yield ("contrastive combine", contrastive._itc_combine_kernel,
               {"stats_ptr": "*fp32", "temp_ptr": "*fp32", "saved_ptr": "*fp32", "loss_ptr": "*fp32",
                "dtemp_ptr": "*fp32", "n_rows": "i32", "alpha": "fp32", "STATS": "constexpr",
                "SAVED": "constexpr", "NUM_SPLITS": "constexpr", "NUM_BLOCKS": "constexpr", "BLOCK_M": "constexpr"},
               {"STATS": contrastive.STATS, "SAVED": contrastive.SAVED, "NUM_SPLITS": 88, "NUM_BLOCKS": 2,
                "BLOCK_M": 64}, 4, DEFAULT_STAGES)


def residual_layer_norm_specs(dtype: str):
    """The sublayer-output kernels at BERT-base's width (768: 1,024-column blocks) with dropout, ``x`` in ``dtype``
    and the residual stream and LayerNorm weights in fp32, as autocast leaves them; the mask kernel (no input dtype)
    once."""
    constexprs = {"DROPOUT": True, "ROWS": residual_layer_norm.ROWS_PER_BLOCK, "BLOCK_N": 1024}
    kinds = {name: "constexpr" for name in constexprs}
    sizes = {"n_rows": "i32", "hidden": "i32"}
    yield (f"residual_layer_norm forward {dtype}", residual_layer_norm._forward_kernel,
           {"x_ptr": f"*{dtype}", "residual_ptr": "*fp32", "weight_ptr": "*fp32", "bias_ptr": "*fp32",
            "out_ptr": "*fp32", "stats_ptr": "*fp32", "seed_ptr": "*i64", **sizes, "eps": "fp32", "dropout_p": "fp32",
            **kinds}, constexprs, 4, DEFAULT_STAGES)
    yield (f"residual_layer_norm backward {dtype}", residual_layer_norm._backward_kernel,
           {"grad_ptr": "*fp32", "x_ptr": f"*{dtype}", "residual_ptr": "*fp32", "weight_ptr": "*fp32",
            "stats_ptr": "*fp32", "seed_ptr": "*i64", "dx_ptr": f"*{dtype}", "dresidual_ptr": "*fp32",
            "dweight_ptr": "*fp32", "dbias_ptr": "*fp32", **sizes, "dropout_p": "fp32", **kinds}, constexprs, 4,
           DEFAULT_STAGES)
    if dtype == "fp32":
        yield ("residual_layer_norm dropout mask", residual_layer_norm._keep_kernel,
               {"keep_ptr": "*i8", "seed_ptr": "*i64", **sizes, "dropout_p": "fp32", "BLOCK_N": "constexpr"},
               {"BLOCK_N": 1024}, 4, DEFAULT_STAGES)


def decode_attention_specs(dtype: str):
    """The decoding step's kernels at head size 64, with a key padding mask and splitting the keys (the variant with
    the most code); the combine reads only fp32 partials, so its dtype is the output's."""
    tiling = decode_attention.DEFAULT_TILING
    blocks = {"BLOCK_M": decode_attention.BLOCK_M, "BLOCK_D": 64}
    strides = {f"stride_{n}{axis}": "i32" for n, axes in (("q", "bhm"), ("k", "bhn"), ("v", "bhn"), ("m", "bn"),
                                                            ("o", "bhm")) for axis in axes}
    yield (f"decode_attention split {dtype}", decode_attention._split_kernel,
           {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "mask_ptr": "*u8", "out_ptr": f"*{dtype}",
            "part_ptr": "*fp32", "stats_ptr": "*fp32", **strides, "heads": "i32", "queries": "i32", "keys": "i32",
            "head_dim": "i32", "scale": "fp32", "keys_per_split": "i32", "HAS_MASK": "constexpr", "SPLIT": "constexpr",
            "PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"},
           {"HAS_MASK": True, "SPLIT": True, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
            "BLOCK_N": tiling.block_n, **blocks}, tiling.num_warps, DEFAULT_STAGES)
    yield (f"decode_attention combine {dtype}", decode_attention._combine_kernel,
           {"part_ptr": "*fp32", "stats_ptr": "*fp32", "out_ptr": f"*{dtype}", "stride_ob": "i32", "stride_oh": "i32",
            "stride_om": "i32", "heads": "i32", "queries": "i32", "head_dim": "i32", "splits": "i32",
            "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"}, blocks, tiling.num_warps, DEFAULT_STAGES)


def varlen_attention_specs(dtype: str):
    """The packed attention's kernels at BERT-base's head size: every causal x dropout variant in bf16 (the dtype the
    training step runs), the largest (causal, with dropout) in the other dtypes."""
    variants = [(True, True)] if dtype != "bf16" else [(True, True), (True, False), (False, True), (False, False)]
    for causal, dropout in variants:
        yield from _varlen_attention_variant(dtype, causal, dropout)
        yield from _single_tile_variant(dtype, int(causal), dropout)
    if dtype == "bf16":  # the joint ITM/LM pass: each sequence's mode from its flag
        yield from _single_tile_variant(dtype, int(varlen_attention.PER_SEQUENCE), True)


def _single_tile_variant(dtype: str, causal: int, dropout: bool):
    """The single-tile kernels at their largest tile (64 rows), head size 64; ``causal`` 0, 1 or PER_SEQUENCE."""
    variant = f"{dtype} causal={causal} dropout={dropout}"
    values = {"CAUSAL": causal, "DROPOUT": dropout, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
              "TILE": varlen_attention.MAX_TILE, "BLOCK_D": 64}
    constexprs = {name: "constexpr" for name in values}
    sizes = {"heads": "i32", "total_q": "i32", "max_kv_len": "i32", "head_dim": "i32", "scale": "fp32",
             "dropout_p": "fp32"}

    def tensors(*names):
        return {f"{n}_ptr": f"*{dtype}" for n in names}

    def strides(*names):
        return {f"stride_{n}{axis}": "i32" for n in names for axis in ("t", "h")}

    yield (f"varlen_attention single-tile forward {variant}", varlen_attention._tile_forward_kernel,
           {**tensors("q", "k", "v", "out"), "lse_ptr": "*fp32", "seed_ptr": "*i64", "q_start_ptr": "*i32",
            "q_len_ptr": "*i32", "kv_group_ptr": "*i32", "kv_start_ptr": "*i32", "kv_len_ptr": "*i32",
            "seq_causal_ptr": "*i8", **strides("q", "k", "v", "o"), **sizes, **constexprs}, values,
           varlen_attention.TILE_WARPS, DEFAULT_STAGES)
    yield (f"varlen_attention single-tile backward {variant}", varlen_attention._tile_backward_kernel,
           {**tensors("q", "k", "v", "out", "grad"), "lse_ptr": "*fp32", **tensors("dq", "dk", "dv"),
            "seed_ptr": "*i64", "q_start_ptr": "*i32", "q_len_ptr": "*i32", "kv_start_ptr": "*i32",
            "kv_len_ptr": "*i32", "group_sequences_ptr": "*i32", "group_offsets_ptr": "*i32", "seq_causal_ptr": "*i8",
            **strides("q", "k", "v", "o", "g", "dq", "dk", "dv"), **sizes, **constexprs}, values,
           varlen_attention.TILE_WARPS, DEFAULT_STAGES)


def _varlen_attention_variant(dtype: str, causal: bool, dropout: bool):
    block_m, block_n = varlen_attention.BLOCKS[causal]
    blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": 64}
    flags = {"CAUSAL": causal, "DROPOUT": dropout, "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    variant = f"{dtype} causal={causal} dropout={dropout}"
    table = {"q_start_ptr": "*i32", "q_len_ptr": "*i32"}
    sizes = {"heads": "i32", "total_q": "i32", "max_kv_len": "i32", "head_dim": "i32", "scale": "fp32",
             "dropout_p": "fp32"}
    constexprs = {name: "constexpr" for name in [*flags, *blocks]}

    def strides(*names):
        return {f"stride_{n}{axis}": "i32" for n in names for axis in ("t", "h")}

    yield (f"varlen_attention forward {variant}", varlen_attention._forward_kernel,
           {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
            "lse_ptr": "*fp32", "seed_ptr": "*i64", **table, "kv_group_ptr": "*i32", "kv_start_ptr": "*i32",
            "kv_len_ptr": "*i32", **strides("q", "k", "v", "o"), **sizes, **constexprs}, {**flags, **blocks}, 4,
           DEFAULT_STAGES)
    if causal and dropout:  # no flags: one variant
        yield (f"varlen_attention delta {dtype}", varlen_attention._delta_kernel,
               {"out_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "delta_ptr": "*fp32", **strides("o", "g"),
                "heads": "i32", "total_q": "i32", "head_dim": "i32", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
               {"BLOCK_M": blocks["BLOCK_M"], "BLOCK_D": 64}, 4, DEFAULT_STAGES)
    yield (f"varlen_attention grad_kv {variant}", varlen_attention._grad_kv_kernel,
           {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}",
            "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dk_ptr": f"*{dtype}", "dv_ptr": f"*{dtype}", "seed_ptr": "*i64",
            **table, "kv_start_ptr": "*i32", "kv_len_ptr": "*i32", "group_sequences_ptr": "*i32",
            "group_offsets_ptr": "*i32", **strides("q", "k", "v", "g", "dk", "dv"), **sizes, **constexprs},
           {**flags, **blocks}, 4, DEFAULT_STAGES)
    yield (f"varlen_attention grad_q {variant}", varlen_attention._grad_q_kernel,
           {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}",
            "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dq_ptr": f"*{dtype}", "seed_ptr": "*i64", **table,
            "kv_group_ptr": "*i32", "kv_start_ptr": "*i32", "kv_len_ptr": "*i32", **strides("q", "k", "v", "g", "dq"),
            **sizes, **constexprs}, {**flags, **blocks}, 4, DEFAULT_STAGES)


def main(arch: int) -> None:
    target = GPUTarget("cuda", arch, 32)
    for name, fn, signature, constexprs, num_warps, num_stages in specs():
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                                  options={"num_warps": num_warps, "num_stages": num_stages})
        print(f"{name}: sm_{arch} cubin of {len(compiled.asm['cubin'])} bytes, shared {compiled.metadata.shared}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
