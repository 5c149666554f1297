"""PGS steps 1-5 (PGS.md): which patches each image keeps.

    images (B,3,H,W), tokens (B,L,D) ──► edges ──► candidates ──► similarity (+OT) ──► threshold
                                                                        ──► keep draw ──► Selection

Everything is batched over images (no Python loop over them), runs without autograd in
float32 whatever the surrounding autocast, and draws all randomness from one
torch.Generator (`pgs_generator`: seeded by seed, step and rank), or from draws keyed by each
sample's global index (`keyed_random.SampleKeyedDraws`, `pgs.rng: sample`). Nothing is read
back from the device when the packed stream has a static token budget (`static=True`,
`pgs.packed_length: static`): its length is B (k_max + 1) plus a little padding, whatever the
counts k_i. With `static=False` the counts are read once to pack exactly sum(k_i + 1) rows, a
host sync that costs nothing on the CPU. Random masking keeps k_max everywhere and needs neither.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from megapgs.config import PGSConfig
from megapgs.packed import Packed
from megapgs.pgs.keep import keep_bounds
from megapgs.pgs.keyed_random import SampleKeyedDraws, uniform
from megapgs.pgs.ot import entropic_balance, reference_balance

# Where the randomness comes from: a per-rank generator (default) or per-sample keyed draws.
RandomSource = torch.Generator | SampleKeyedDraws

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


@functools.cache
def _sobel_kernels(device: torch.device) -> torch.Tensor:
    """(2, 1, 3, 3) Gx, Gy on `device`: copied there once, not every step (a host-to-device copy
    from pageable memory waits for the device)."""
    return torch.stack([_SOBEL_X, _SOBEL_X.t()])[:, None].to(device)


@dataclass(frozen=True, eq=False)
class Selection:
    """The patches kept per image. Row i of `kept_idx` holds image i's k_i kept patch indices
    in ascending order, then the sentinel L (no patch) up to the row width k_max."""
    kept_idx: torch.Tensor        # (B, k_max) int64, sorted; entries past counts[i] are L
    counts: torch.Tensor          # (B,) int64 on the device: k_i
    packed: Packed                # sequence i = [CLS, k_i kept tokens]: lengths k_i + 1
    num_patches: int              # L
    stats: dict[str, torch.Tensor]  # 0-d device tensors, fetched by the loop every N steps

    def kept_mask(self) -> torch.Tensor:
        """(B, L) bool: True where the patch is kept."""
        B = self.kept_idx.shape[0]
        mask = torch.zeros(B, self.num_patches + 1, dtype=torch.bool, device=self.kept_idx.device)
        mask.scatter_(1, self.kept_idx, True)
        return mask[:, : self.num_patches]


def pgs_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one step's masks on one rank: a resumed run redraws the same masks,
    every rank draws different ones. numpy's SeedSequence mixes the three integers so that
    nearby (seed, step, rank) triples give unrelated streams."""
    if min(seed, step, rank) < 0:
        raise ValueError(f"seed, step and rank must be >= 0, got {(seed, step, rank)}")
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state[0]) << 32 | int(state[1]))
    return gen


def embed_weight(schedule: str, progress: float) -> float:
    """w of S = (1-w) S_pix + w S_emb: the completed share of training, or fixed 0 / 1."""
    if schedule == "progress":
        return min(max(float(progress), 0.0), 1.0)
    if schedule == "pixels":
        return 0.0
    if schedule == "tokens":
        return 1.0
    raise ValueError(f"unknown embed_sim_schedule {schedule!r}; allowed: progress, pixels, tokens")


def num_candidates(candidate_ratio: float, num_patches: int) -> int:
    """n_c = max(1, round(c L)), halves rounded up."""
    return max(1, int(candidate_ratio * num_patches + 0.5))


def sobel_magnitude(images_BCHW: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) Sobel gradient magnitude of the grey (channel-mean) image. The border is
    replicated, so the frame of the image is not an edge."""
    grey = images_BCHW.float().mean(dim=1, keepdim=True)                        # (B,1,H,W)
    kernels = _sobel_kernels(grey.device)                                       # (2,1,3,3)
    grads = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)     # (B,2,H,W)
    return grads.square().sum(dim=1, keepdim=True).sqrt()


def edge_scores(images_BCHW: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, L) per-patch edge score in [0, 1] (step 1): Sobel on the image's pixels, mean
    magnitude per patch, min-max normalised per image."""
    scores = F.avg_pool2d(sobel_magnitude(images_BCHW), patch_size).flatten(1)   # (B,L)
    low = scores.amin(dim=1, keepdim=True)
    high = scores.amax(dim=1, keepdim=True)
    return (scores - low) / (high - low + 1e-6)


def patch_pixels(images_BCHW: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, L, 3 p p): each patch's raw pixels, standardised over its own values and scaled
    to unit length, so dot products are cosine similarities. A flat patch becomes zeros."""
    B, C, H, W = images_BCHW.shape
    p = patch_size
    x = images_BCHW.float().reshape(B, C, H // p, p, W // p, p)
    patches = x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)  # (B,L,F)
    mean = patches.mean(dim=2, keepdim=True)
    std = patches.std(dim=2, keepdim=True, unbiased=False)
    return F.normalize((patches - mean) / (std + 1e-6), dim=2)


def _unit_features(images_BCHW: torch.Tensor, tokens_BLD: torch.Tensor, patch_size: int,
                   weight: float) -> list[tuple[float, torch.Tensor]]:
    """[(weight, unit-length features (B, L, F))] of the similarity's non-zero terms."""
    terms = []
    if weight < 1:
        terms.append((1.0 - weight, patch_pixels(images_BCHW, patch_size)))
    if weight > 0:
        terms.append((weight, F.normalize(tokens_BLD.float(), dim=2)))
    return terms


def candidate_similarity(images_BCHW: torch.Tensor, tokens_BLD: torch.Tensor, candidates_BN: torch.Tensor,
                         cfg: PGSConfig, patch_size: int, weight: float) -> torch.Tensor:
    """(B, n_c, L): the candidate rows of S̃ (steps 3-4). With OT the whole L x L matrix is
    balanced first; without it only the n_c candidate rows are computed."""
    terms = _unit_features(images_BCHW, tokens_BLD, patch_size, weight)
    if not cfg.use_ot:
        rows = 0
        for w, feats in terms:
            cand = feats.gather(1, candidates_BN[..., None].expand(-1, -1, feats.shape[2]))
            rows = rows + w * torch.bmm(cand, feats.transpose(1, 2))        # (B,n_c,L)
        return rows
    sim = 0
    for w, feats in terms:
        sim = sim + w * torch.bmm(feats, feats.transpose(1, 2))             # (B,L,L)
    if cfg.ot == "entropic":
        balanced = sim + entropic_balance(sim, cfg.ot_reg, cfg.ot_iters)
    else:
        balanced = sim + reference_balance(sim, cfg.ot_iters)
    return balanced.gather(1, candidates_BN[..., None].expand(-1, -1, sim.shape[2]))


def draw_candidates(images_BCHW: torch.Tensor, cfg: PGSConfig, patch_size: int, num_patches: int,
                    generator: RandomSource) -> torch.Tensor:
    """(B, n_c) candidate patch indices (step 2). `paper`: the n_c lowest of u + beta*edge
    (the flattest patches); `reference`, `use_edges: false` or beta = 0: uniform at random."""
    B = images_BCHW.shape[0]
    noise = uniform(generator, B, num_patches, 0, images_BCHW.device)
    scores = noise
    if cfg.candidate_policy == "paper" and cfg.use_edges and cfg.edge_weight > 0:
        scores = noise + cfg.edge_weight * edge_scores(images_BCHW, patch_size)
    n_c = num_candidates(cfg.candidate_ratio, num_patches)
    return torch.topk(scores, n_c, dim=1, largest=False).indices


def _finish(priority_BL: torch.Tensor, counts_B: torch.Tensor, k_bounds: tuple[int, int], num_patches: int,
            stats: dict[str, torch.Tensor], static: bool) -> Selection:
    """Keep the counts[i] highest-priority patches of each image, sorted by index, and lay out
    the packed stream: a static token budget (`static`: nothing read back from the device), or
    exactly sum(k_i + 1) rows (the counts read on the host: a sync)."""
    k_min, k_max = k_bounds
    order = torch.topk(priority_BL, k_max, dim=1).indices                           # (B,k_max)
    slot = torch.arange(k_max, device=order.device)
    kept = torch.where(slot[None, :] < counts_B[:, None], order, num_patches)
    kept_idx = kept.sort(dim=1).values
    if static:
        packed = Packed.with_budget(counts_B + 1, k_min + 1, k_max + 1)
    else:
        packed = Packed.from_lengths((counts_B.cpu() + 1).tolist(), device=kept_idx.device)  # host sync
    keep_ratio = counts_B.float() / num_patches
    B = counts_B.numel()
    stats = dict(stats, keep_ratio_mean=keep_ratio.mean(), keep_ratio_min=keep_ratio.min(),
                 keep_ratio_max=keep_ratio.max(),
                 tokens_saved=1 - (counts_B.sum() + B).float() / (B * (num_patches + 1)))
    return Selection(kept_idx, counts_B, packed, num_patches, stats)


@torch.no_grad()
def random_selection(batch: int, num_patches: int, cfg: PGSConfig, generator: RandomSource,
                     device: torch.device | str) -> Selection:
    """FLIP-style random masking at PGS's cap: every image keeps k_max patches drawn uniformly.
    All sequences have k_max + 1 rows: a plain uniform layout, with no sync and no padding."""
    _, k_max = keep_bounds(num_patches, cfg.min_mask_ratio, cfg.min_keep_ratio)
    priority = uniform(generator, batch, num_patches, 1, device)
    order = torch.topk(priority, k_max, dim=1).indices
    kept_idx = order.sort(dim=1).values
    counts = torch.full((batch,), k_max, dtype=torch.int64, device=device)
    keep_ratio = torch.full((), k_max / num_patches, device=device)
    stats = dict(keep_ratio_mean=keep_ratio, keep_ratio_min=keep_ratio, keep_ratio_max=keep_ratio,
                 tokens_saved=torch.full((), 1 - (k_max + 1) / (num_patches + 1), device=device))
    return Selection(kept_idx, counts, Packed.uniform(batch, k_max + 1, device), num_patches, stats)


@torch.no_grad()
def select_patches(images_BCHW: torch.Tensor, tokens_BLD: torch.Tensor, patch_size: int, cfg: PGSConfig,
                   progress: float, generator: RandomSource, static: bool = False) -> Selection:
    """PGS steps 1-5 for a batch: images (B,3,H,W) as the tower sees them, patch tokens
    (B,L,D) with positional embeddings (CLS excluded), training progress in [0, 1]. `static`
    packs into the static token budget (no host sync); otherwise the counts are read back."""
    B, _, H, W = images_BCHW.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch_size}")
    L = (H // patch_size) * (W // patch_size)
    if tokens_BLD.shape[:2] != (B, L):
        raise ValueError(f"tokens {tuple(tokens_BLD.shape)} do not match {B} images of {L} patches")
    k_min, k_max = keep_bounds(L, cfg.min_mask_ratio, cfg.min_keep_ratio)
    device = images_BCHW.device
    with torch.autocast(device.type, enabled=False):
        candidates = draw_candidates(images_BCHW, cfg, patch_size, L, generator)         # (B,n_c)
        weight = embed_weight(cfg.embed_sim_schedule, progress)
        rows = candidate_similarity(images_BCHW, tokens_BLD.detach(), candidates, cfg, patch_size, weight)
        masked = rows.amax(dim=1) > cfg.sim_threshold                                    # (B,L)
        masked.scatter_(1, candidates, True)
        eligible = ~masked
        num_eligible = eligible.sum(dim=1)                                               # (B,)
        counts = num_eligible.clamp(min=k_min, max=k_max)
        if not cfg.pack:  # the reference's batch-uniform length, for padded back-ends
            counts = counts.amin().expand(B)
        # Eligible patches rank above masked ones, each group in uniformly random order, so
        # the first k_i are a uniform draw from the eligible (topped up from M_i if short).
        priority = uniform(generator, B, L, 1, device) + 2.0 * eligible
        stats = {
            "candidates_mean": torch.full((), float(candidates.shape[1]), device=device),
            "sim_masked_mean": (masked.sum(dim=1) - candidates.shape[1]).float().mean(),
            "topped_up_mean": (counts - num_eligible).clamp(min=0).float().mean(),
            "embed_weight": torch.full((), weight, device=device),
        }
        return _finish(priority, counts, (k_min, k_max), L, stats, static)
