"""Per-block ``torch.compile`` of BLIP models (torchtitan's ``apply_compile``).

Every ViT block and every text transformer layer -- of the encoder, the decoder and the momentum
copies -- is compiled on its own, in place (``nn.Module.compile``: parameter names and checkpoints
are unchanged). The Python around them stays eager: embeddings, the K/V projection of the image
tokens, losses, hard-negative sampling, the momentum update and the queues. Compiling a block is
short, a graph break can only split a block, and a recompilation is that of one block.

Shapes. Images have a fixed size, so ViT blocks see static shapes. Captions are padded to the
longest of their batch, so the text layers see a new length L almost every step. With
``dynamic=None`` (torch's default, kept here) dynamo compiles a layer's first call for its exact
shapes and, when a later call differs in a dimension, recompiles it once with that dimension
symbolic; every later length reuses that graph. So each use of a text layer (unimodal encoder,
ITM encoder, LM decoder, momentum encoder) costs two compilations in all, not one per length.
``dynamic=True`` would skip the static first graph but also make the ViT's shapes symbolic, for
no gain; ``dynamic=False`` would recompile for every caption length.

A text layer also takes the per-layer object that says how its rows attend (``med.PaddedRows``, or
``fast_passes.FastRows`` / ``JointRows``): NamedTuples of tensors, bools, modules and the layer's
index, which dynamo guards field by field as the layer reads them, so they add no graphs of their
own (as many as when the layer took those values as arguments).
"""

from __future__ import annotations

import torch
from torch import nn

from .med import TextLayer
from .vit import Block

COMPILED_CLASSES = (Block, TextLayer)
# dynamo's default recompile_limit: the graphs it allows one guarded module instance
GRAPHS_PER_BLOCK = 8


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """Compile each ViT block and text layer of ``model`` in place; returns how many were compiled.

    ``compile_kwargs`` go to ``torch.compile`` (``fullgraph=True``, ``backend``, ``mode`` ...).
    Shared modules are compiled once. Raises dynamo's recompile limits where needed (see below);
    never lowers them.
    """
    blocks = [module for module in model.modules() if isinstance(module, COMPILED_CLASSES)]
    for block in blocks:
        block.compile(**compile_kwargs)
    # Dynamo keeps graphs per code object, and the blocks of one class share their forward's code
    # without a guard on the instance (parameters are graph inputs), so dynamo's limit of 8 graphs
    # covers all of them together: ViT-L's 24 blocks, each with its own drop-path rate, need 24
    # graphs (a fullgraph compile fails past the limit, others fall back to eager), and each text
    # layer one per use and shape regime. Give the code object the budget of all its instances.
    largest_class = max((sum(isinstance(b, cls) for b in blocks) for cls in COMPILED_CLASSES), default=0)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, GRAPHS_PER_BLOCK * largest_class)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, config.recompile_limit)
    return len(blocks)
