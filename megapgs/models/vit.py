"""The image tower: patch embedding -> (which tokens to keep) -> packed blocks -> CLS pooling -> projection.

OpenCLIP's VisionTransformer, parameter for parameter (`conv1`, `class_embedding`,
`positional_embedding`, `ln_pre`, `transformer`, `ln_post`, `proj`), made to run on packed
variable-length input: after PGS every image keeps its own number of tokens.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megapgs.models.archs import VisionSpec
from megapgs.models.blocks import Transformer
from megapgs.packed import Packed

# keep(images_BCHW, cls_D, tokens_BLD) -> (x_TD, packed): the tokens that go through the blocks,
# CLS first in each sequence. Training passes PGS (or random masking); None keeps every token.
KeepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Packed]]


class VisionTower(nn.Module):
    def __init__(self, spec: VisionSpec, embed_dim: int):
        super().__init__()
        self.spec = spec
        width, scale = spec.width, spec.width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=spec.patch_size, stride=spec.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(spec.num_patches + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, spec.layers, spec.heads, spec.mlp_width, causal=False)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def embed(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS token (D,), patch tokens (B, L, D)), positional embeddings added: PGS sees these."""
        size = self.spec.image_size
        if images_BCHW.ndim != 4 or tuple(images_BCHW.shape[1:]) != (3, size, size):
            raise ValueError(f"expected images of shape (B, 3, {size}, {size}), got {tuple(images_BCHW.shape)}")
        x_BDgg = self.conv1(images_BCHW)
        tokens_BLD = x_BDgg.flatten(2).transpose(1, 2) + self.positional_embedding[1:]
        cls_D = self.class_embedding + self.positional_embedding[0]
        return cls_D, tokens_BLD

    def forward(self, images_BCHW: torch.Tensor, keep: KeepFn | None = None) -> torch.Tensor:
        cls_D, tokens_BLD = self.embed(images_BCHW)
        if keep is None:  # every token: the plain (B, L+1, D) batch, flattened
            B, L, D = tokens_BLD.shape
            x_TD = torch.cat([cls_D.expand(B, 1, D), tokens_BLD], dim=1).reshape(B * (L + 1), D)
            packed = Packed.uniform(B, L + 1, device=x_TD.device)
        else:
            x_TD, packed = keep(images_BCHW, cls_D, tokens_BLD)
        x_TD = self.transformer(self.ln_pre(x_TD), packed)
        pooled_BD = self.ln_post(x_TD[packed.first_rows()])  # the CLS row of each sequence
        return pooled_BD @ self.proj


def resize_positional_embedding(pos_ND: torch.Tensor, grid: int) -> torch.Tensor:
    """A (1 + g*g, D) positional embedding (CLS row first, then the patch grid row by row, as the patch
    embedding flattens it) resized to a grid x grid patch grid: the CLS row kept, the 2-D grid
    interpolated bicubically with antialiasing, as OpenCLIP's `resize_pos_embed` does (fine-tuning at
    another image size, as FLIP and CLIPA do). Computed in fp32, returned in the input's dtype."""
    N, D = pos_ND.shape
    old = round((N - 1) ** 0.5)
    if old * old != N - 1:
        raise ValueError(f"positional embedding of {N} rows is not CLS plus a square grid")
    if old == grid:
        return pos_ND
    grid_1Dgg = pos_ND[1:].float().reshape(1, old, old, D).permute(0, 3, 1, 2)
    grid_1Dgg = F.interpolate(grid_1Dgg, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patches_LD = grid_1Dgg.permute(0, 2, 3, 1).reshape(grid * grid, D).to(pos_ND.dtype)
    return torch.cat([pos_ND[:1], patches_LD], dim=0)
