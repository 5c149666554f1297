"""PGS step 6: the kept tokens of the whole batch as one packed (T, D) stream.

Sequence i is [CLS_i, kept tokens of image i] (in patch order; each token carries its
positional embedding, so order is only a convention). T = sum_i (k_i + 1); the `Packed`
layout (cu_seqlens, max_seqlen) comes with the Selection. No mask, no padding.
"""
from __future__ import annotations

import torch

from megapgs.config import PGSConfig
from megapgs.packed import Packed
from megapgs.pgs.selection import RandomSource, Selection, random_selection, select_patches


def pack_tokens(cls_D: torch.Tensor, tokens_BLD: torch.Tensor, selection: Selection) -> torch.Tensor:
    """(T, D) packed stream; differentiable in `cls_D` ((D,) or (B, D)) and `tokens_BLD`. Rows of
    a token budget's padding segments are zeros."""
    B, L, D = tokens_BLD.shape
    K = selection.kept_idx.shape[1]
    slots = selection.kept_idx.clamp(max=L - 1)  # sentinels read any real row; dropped below
    kept_BKD = tokens_BLD.gather(1, slots[..., None].expand(B, K, D))
    seqs_BSD = torch.cat([cls_D.expand(B, D)[:, None], kept_BKD], dim=1)           # (B, K+1, D)
    packed = selection.packed
    if packed.is_uniform and packed.max_seqlen == K + 1:
        return seqs_BSD.reshape(B * (K + 1), D)
    segment, position = packed.seq_ids(), packed.positions()                        # (T,), (T,)
    zero_row = B * (K + 1)  # one zero row after the sequences, read by every padding row
    rows = torch.where(segment < B, segment * (K + 1) + position, zero_row)
    stream_ND = torch.cat([seqs_BSD.reshape(B * (K + 1), D), seqs_BSD.new_zeros(1, D)])
    return stream_ND[rows]


class PatchMasker:
    """The image tower's `keep` function for one micro-batch: random masking or PGS.

    Call it as `model.visual(images, keep=masker)`; afterwards `masker.selection` holds what
    was kept (for the step's metrics and for tests). The first call draws the selection; later
    calls pack the same one again (feature caching runs each micro-batch twice: the second
    pass, with gradients, must see the first pass's masks). `static` packs into the static
    token budget (no host sync)."""

    def __init__(self, cfg: PGSConfig, patch_size: int, progress: float, generator: RandomSource,
                 static: bool = False):
        if cfg.masking == "none":
            raise ValueError("pgs.masking is 'none': run the tower without a keep function")
        self.cfg, self.patch_size, self.progress, self.generator = cfg, patch_size, progress, generator
        self.static = static
        self.selection: Selection | None = None

    def __call__(self, images_BCHW: torch.Tensor, cls_D: torch.Tensor,
                 tokens_BLD: torch.Tensor) -> tuple[torch.Tensor, Packed]:
        B, L, _ = tokens_BLD.shape
        if self.selection is None:
            if self.cfg.masking == "random":
                self.selection = random_selection(B, L, self.cfg, self.generator, tokens_BLD.device)
            else:
                self.selection = select_patches(images_BCHW, tokens_BLD, self.patch_size, self.cfg,
                                                self.progress, self.generator, static=self.static)
        elif self.selection.kept_idx.shape[0] != B:
            raise ValueError(f"this masker selected for {self.selection.kept_idx.shape[0]} images, not {B}")
        return pack_tokens(cls_D, tokens_BLD, self.selection), self.selection.packed
