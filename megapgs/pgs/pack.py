"""PGS step 6: the kept tokens of the whole batch as one packed (T, D) stream.

Sequence i is [CLS_i, kept tokens of image i] (in patch order; each token carries its
positional embedding, so order is only a convention). T = sum_i (k_i + 1); the `Packed`
layout (cu_seqlens, max_seqlen) comes with the Selection. No mask, no padding.
"""
from __future__ import annotations

import torch

from megapgs.config import PGSConfig
from megapgs.models.packed import Packed
from megapgs.pgs.selection import RandomSource, Selection, random_selection, select_patches


def pack_tokens(cls_D: torch.Tensor, tokens_BLD: torch.Tensor, selection: Selection) -> torch.Tensor:
    """(T, D) packed stream; differentiable in `cls_D` ((D,) or (B, D)) and `tokens_BLD`."""
    B, L, D = tokens_BLD.shape
    K = selection.kept_idx.shape[1]
    slots = selection.kept_idx.clamp(max=L - 1)  # sentinels read any real row; dropped below
    kept_BKD = tokens_BLD.gather(1, slots[..., None].expand(B, K, D))
    seqs_BSD = torch.cat([cls_D.expand(B, D)[:, None], kept_BKD], dim=1)           # (B, K+1, D)
    packed = selection.packed
    if packed.is_uniform and packed.max_seqlen == K + 1:
        return seqs_BSD.reshape(B * (K + 1), D)
    rows = packed.seq_ids() * (K + 1) + packed.positions()                          # (T,)
    return seqs_BSD.reshape(B * (K + 1), D)[rows]


class PatchMasker:
    """The image tower's `keep` function for one training step: random masking or PGS.

    Call it as `model.visual(images, keep=masker)`; afterwards `masker.selection` holds what
    was kept (for the step's metrics and for tests)."""

    def __init__(self, cfg: PGSConfig, patch_size: int, progress: float, generator: RandomSource):
        if cfg.masking == "none":
            raise ValueError("pgs.masking is 'none': run the tower without a keep function")
        self.cfg, self.patch_size, self.progress, self.generator = cfg, patch_size, progress, generator
        self.selection: Selection | None = None

    def __call__(self, images_BCHW: torch.Tensor, cls_D: torch.Tensor,
                 tokens_BLD: torch.Tensor) -> tuple[torch.Tensor, Packed]:
        B, L, _ = tokens_BLD.shape
        if self.cfg.masking == "random":
            self.selection = random_selection(B, L, self.cfg, self.generator, tokens_BLD.device)
        else:
            self.selection = select_patches(images_BCHW, tokens_BLD, self.patch_size, self.cfg,
                                            self.progress, self.generator)
        return pack_tokens(cls_D, tokens_BLD, self.selection), self.selection.packed
