"""Vision Transformer image encoder (Dosovitskiy et al. 2021), as BLIP's ``models/vit.py``.

Pre-norm blocks ``x + DropPath(Attn(LN(x)))``, ``x + DropPath(MLP(LN(x)))``, a [CLS] token and
learned position embeddings; the output is every token after the final LayerNorm. Parameter
names follow timm (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv`` ...)
so the original checkpoints load as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..config import VisionConfig


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, width * 3)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, D)
        out = ops.attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float, eps: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        # round, not int: a ratio read from a checkpoint (240 / 176) times the width can fall just below the integer
        self.mlp = Mlp(width, round(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """The patch embedding: timm's ``Conv2d(3, width, kernel_size=P, stride=P)``, computed as one GEMM.

    A convolution whose stride is its kernel size maps each non-overlapping P x P patch linearly: the same products
    are the unfolded patches (B, N, 3 P^2) times the kernel viewed as (width, 3 P^2). On an H100 the bf16
    convolution, with cuDNN's NCHW -> NHWC transposes, took several times what a GEMM of its FLOPs takes
    (docs/benchmarks.md, the step's profile; two calls a step, online and momentum ViT). The parameter stays the
    ``Conv2d``'s (names and checkpoints unchanged); ``tests/models/test_models.py`` compares it with the convolution.
    """

    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), H and W multiples of P -> (B, H/P * W/P, width), patches in row-major order."""
        batch, channels, height, width = images.shape
        size = self.proj.kernel_size[0]
        rows, cols = height // size, width // size
        patches = (images.reshape(batch, channels, rows, size, cols, size).permute(0, 2, 4, 1, 3, 5)
                   .reshape(batch, rows * cols, channels * size * size))  # each patch's (channel, y, x) values
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config.patch_size, config.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.width))
        rates = torch.linspace(0, config.drop_path_rate, config.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(config.width, config.num_heads, config.mlp_ratio, config.layer_norm_eps, rate) for rate in rates
        )
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original init: truncated normal (std 0.02) for position/cls and Linear weights."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a tensor (B, 3, H, W); got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W); got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating point tensor (normalized pixels); got {images.dtype}")
        size = self.config.patch_size
        if images.shape[2] % size or images.shape[3] % size:
            raise ValueError(f"image height and width must be multiples of the patch size {size}; "
                             f"got {images.shape[2]}x{images.shape[3]}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized pixels -> (B, 1 + H*W/P^2, width) tokens, [CLS] first."""
        self.check_images(images)
        x = self.patch_embed(images.to(self.patch_embed.proj.weight.dtype))
        grid = (images.shape[2] // self.config.patch_size, images.shape[3] // self.config.patch_size)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + position_embedding_for(self.pos_embed, grid)
        for block in self.blocks:
            if self.config.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)


def position_embedding_for(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Position embeddings for a ``grid`` of patches, bicubically resampled when it differs.

    Same as the original ``interpolate_pos_embed`` (and Hugging Face's ``interpolate_pos_encoding``):
    the [CLS] embedding is kept, the square patch grid is resized with bicubic interpolation,
    ``align_corners=False``.
    """
    patches = pos_embed.shape[1] - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"position embedding of {patches} patches is not a square grid")
    if (side, side) == grid:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, C, side, side)
    # bicubic resampling in at least fp32 (half precision is not supported by every backend)
    compute = torch.promote_types(pos_embed.dtype, torch.float32)
    patch_pos = F.interpolate(patch_pos.to(compute), size=grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).flatten(1, 2)  # (1, gh*gw, C)
    return torch.cat([cls_pos, patch_pos], dim=1)
