"""Compile every Triton kernel of blip_fast ahead of time for a CUDA architecture, in each dtype it takes.

    TRITON_INTERPRET=0 python tests/kernels/compile_for_gpu.py [ARCH]      # ARCH: 90 (H100, the default)

Needs no GPU: Triton lowers to PTX and assembles with the ptxas it ships. Prints one line per kernel and
dtype; a kernel that does not compile raises. Used by test_gpu_compile.py.
"""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from blip_fast.kernels import hard_negatives, lm_loss

DTYPES = ("bf16", "fp16", "fp32")


def specs():
    """(name, jit function, signature, constexprs, num_warps) at BLIP's shapes."""
    for dtype in DTYPES:
        yield (f"hard_negatives {dtype}", hard_negatives._hard_negatives_kernel,
               {"sim_ptr": f"*{dtype}", "uniforms_ptr": "*fp32", "out_ptr": "*i64", "N": "i32",
                "stride_row": "i32", "stride_col": "i32", "BLOCK_N": "constexpr", "NUM_BLOCKS": "constexpr"},
               {"BLOCK_N": 128, "NUM_BLOCKS": 1}, 1)
        for write_grad in (True, False):
            yield (f"lm_loss {dtype} write_grad={write_grad}", lm_loss._smoothed_cross_entropy_kernel,
                   {"logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "loss_ptr": "*fp32", "scale_ptr": "*fp32",
                    "stride_row": "i32", "stride_scale": "i32", "V": "i32", "smoothing": "fp32",
                    "BLOCK_V": "constexpr", "NUM_BLOCKS": "constexpr", "WRITE_GRAD": "constexpr"},
                   {"BLOCK_V": lm_loss.MAX_BLOCK_V, "NUM_BLOCKS": 8, "WRITE_GRAD": write_grad}, 8)


def main(arch: int) -> None:
    target = GPUTarget("cuda", arch, 32)
    for name, fn, signature, constexprs, num_warps in specs():
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                                  options={"num_warps": num_warps})
        print(f"{name}: sm_{arch} cubin of {len(compiled.asm['cubin'])} bytes")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
