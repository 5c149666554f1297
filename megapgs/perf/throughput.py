"""The work of one training sample, in FLOPs, and what it makes of samples/s at a stated utilisation.

Two counts per sample, both from perf/flops.py's counter (matmuls and attention over each sequence's
own length):

    model FLOPs     3 x the forward of the tokens that carry information: CLS + the patches PGS kept
                    (the share it realises, not its cap) and the caption (the usual MFU convention).
    executed FLOPs  what the GPU runs: every pass of the step over the rows it computes. Passes: the
                    forward, the backward (2 forwards), the recomputed forward under activation
                    checkpointing, and the feature cache's no-grad forward when the loss sees the global
                    batch through accumulation. Rows: on CUDA PGS packs into a static budget of
                    B (k_max + 1) rows plus padding segments (`pgs.packed_length: static`, CUDA's default),
                    so its matmuls run on k_max + 1 rows per image whatever PGS kept; `exact` packing
                    computes only the kept rows (one host sync per micro-batch).

The realised kept share comes from running megapgs's own PGS selection on photos (`measured_keep`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megapgs.config import PGSConfig
from megapgs.models.archs import ArchSpec
from megapgs.packed import Packed
from megapgs.perf.flops import clip_forward_flops_from_sums
from megapgs.pgs.keep import keep_bounds


@dataclass(frozen=True)
class Keep:
    """Image sequence lengths (CLS + kept patches) per image: their mean and mean square."""
    mean_len: float
    mean_sq_len: float

    def kept_share(self, num_patches: int) -> float:
        return (self.mean_len - 1) / num_patches

    @classmethod
    def uniform(cls, length: int) -> Keep:
        return cls(float(length), float(length * length))


def measured_keep(arch: ArchSpec, pgs: PGSConfig, progress: float = 0.0, draws: int = 4) -> Keep:
    """The lengths PGS gives scikit-image's photos (megapgs/data/photos.py) at this arch's image and
    patch size, `draws` independent draws each, at training progress `progress` (0: the similarity is
    the pixels'; the token term needs a trained tower)."""
    from megapgs.data.photos import photo_batch
    from megapgs.pgs.selection import pgs_generator, select_patches

    L = arch.vision.num_patches
    if pgs.masking != "pgs":  # none keeps every patch, random (FLIP) keeps k_max of each image
        return Keep.uniform(1 + (L if pgs.masking == "none" else
                                 keep_bounds(L, pgs.min_mask_ratio, pgs.min_keep_ratio)[1]))
    images = photo_batch(arch.vision.image_size)
    tokens = torch.randn(images.shape[0], L, 8, generator=torch.Generator().manual_seed(0))
    counts = torch.cat([select_patches(images, tokens, arch.vision.patch_size, pgs, progress,
                                       pgs_generator(0, draw, 0)).counts for draw in range(draws)])
    lengths = counts.double() + 1
    return Keep(float(lengths.mean()), float((lengths * lengths).mean()))


def image_rows(arch: ArchSpec, pgs: PGSConfig, keep: Keep, static: bool, batch: int) -> tuple[float, float]:
    """(rows, sum of squared segment lengths) per image that the image tower's blocks compute."""
    if not static or pgs.masking != "pgs":
        return keep.mean_len, keep.mean_sq_len
    k_min, k_max = keep_bounds(arch.vision.num_patches, pgs.min_mask_ratio, pgs.min_keep_ratio)
    total, pads = Packed.budget_for(batch, k_min + 1, k_max + 1)
    padding = total - batch * keep.mean_len              # rows of the padding segments, split evenly
    return total / batch, keep.mean_sq_len + pads * (padding / pads) ** 2 / batch


def forward_flops(arch: ArchSpec, rows: float, sq: float, caption_tokens: int) -> float:
    """Forward FLOPs of one sample: an image sequence of `rows` rows (sum of squares `sq`) and a caption."""
    return clip_forward_flops_from_sums(arch, 1, rows, sq, 1, caption_tokens, caption_tokens**2)["total"]


def forward_passes(checkpointing: bool, feature_caching: bool) -> int:
    """Forward-equivalents a sample costs per step: forward + backward (2) + recompute + cache pass."""
    return 3 + int(checkpointing) + int(feature_caching)


@dataclass(frozen=True)
class SampleWork:
    model_flops: float       # 3 x forward of the kept tokens
    executed_flops: float    # every pass over the rows computed

    def samples_per_s(self, peak_flops: float, utilisation: float) -> float:
        """Per GPU, when it runs the executed FLOPs at `utilisation` of `peak_flops`."""
        return peak_flops * utilisation / self.executed_flops

    def mfu(self, samples_per_s: float, peak_flops: float) -> float:
        return self.model_flops * samples_per_s / peak_flops


def sample_work(arch: ArchSpec, pgs: PGSConfig, keep: Keep, *, masked: bool, static: bool, batch: int,
                checkpointing: bool, feature_caching: bool, caption_tokens: int) -> SampleWork:
    """The FLOPs of one sample in a masked step (`masked`) or an unmasked one (the unmasked tail)."""
    full = Keep.uniform(arch.vision.num_patches + 1)
    useful = keep if masked else full
    rows, sq = image_rows(arch, pgs, keep, static, batch) if masked else (full.mean_len, full.mean_sq_len)
    passes = forward_passes(checkpointing, feature_caching)
    return SampleWork(3 * forward_flops(arch, useful.mean_len, useful.mean_sq_len, caption_tokens),
                      passes * forward_flops(arch, rows, sq, caption_tokens))
