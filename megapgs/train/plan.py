"""The numbers a run derives from its config, its ranks and its data, computed once at start-up.

Everything here is arithmetic on validated inputs: how many micro-batches make a step, how many
steps the run takes, how many image tokens each sample keeps. An impossible combination (a batch
that does not split over the ranks, epochs without a known epoch size) stops the run here, with
the key to change.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from megapgs.config import Config, ConfigError
from megapgs.data.prepare import DataPlan
from megapgs.dist import DistInfo
from megapgs.models.archs import ArchSpec, get_arch
from megapgs.models.attention import refused_backend_reason
from megapgs.pgs.keep import keep_bounds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    arch: ArchSpec
    world_size: int
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    total_steps: int
    samples_per_epoch: int | None
    image_tokens: int          # patches L of an unmasked image (CLS not counted)
    kept_tokens: tuple[int, int]  # (k_min, k_max) patches kept per training image
    feature_caching: bool      # the loss over the global batch through accumulation (train/step.py)
    contrastive_batch_size: int   # pairs the contrastive loss sees at once
    static_packing: bool       # PGS packs into a static token budget (no host sync)

    @property
    def epochs(self) -> float | None:
        if not self.samples_per_epoch:
            return None
        return self.total_steps * self.global_batch_size / self.samples_per_epoch


def plan_run(cfg: Config, dist: DistInfo, data: DataPlan) -> RunPlan:
    train = cfg.train
    per_step_rank = train.micro_batch_size * dist.world_size
    if train.global_batch_size % per_step_rank:
        raise ConfigError(f"train.global_batch_size = {train.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size x ranks = {train.micro_batch_size} x {dist.world_size}")
    samples = data.train_samples
    if train.steps is not None:
        total_steps = train.steps
    elif samples:
        assert train.epochs is not None  # the schema sets exactly one of steps and epochs
        total_steps = max(1, math.ceil(train.epochs * samples / train.global_batch_size))
    else:
        raise ConfigError("train.epochs needs the epoch size: give a shard manifest in data.train_shards "
                          "or set data.samples_per_epoch (or use train.steps)")
    arch = get_arch(cfg.model.arch)
    num_patches = arch.vision.num_patches
    if cfg.pgs.masking == "none":
        kept = (num_patches, num_patches)
    elif cfg.pgs.masking == "random":  # FLIP-style: every image keeps k_max
        k_max = keep_bounds(num_patches, cfg.pgs.min_mask_ratio, cfg.pgs.min_keep_ratio)[1]
        kept = (k_max, k_max)
    else:
        kept = keep_bounds(num_patches, cfg.pgs.min_mask_ratio, cfg.pgs.min_keep_ratio)
    accum = train.global_batch_size // per_step_rank
    feature_caching = train.contrastive_batch == "global" and accum > 1
    contrastive = train.global_batch_size if train.contrastive_batch == "global" else per_step_rank
    if train.contrastive_batch == "micro_batch" and accum > 1:
        log.warning("train.contrastive_batch = micro_batch: the loss sees %d pairs at a time (%d per rank x %d ranks), "
                    "not the global batch of %d; the default 'global' caches features to see them all",
                    per_step_rank, train.micro_batch_size, dist.world_size, train.global_batch_size)
    reason = refused_backend_reason(cfg.model.attention, dist.device, training=True)
    if reason:
        raise ConfigError(f"model.attention: {reason}")
    static = cfg.pgs.packed_length == "static" or (cfg.pgs.packed_length == "auto" and dist.device.type == "cuda")
    return RunPlan(arch=arch, world_size=dist.world_size, micro_batch_size=train.micro_batch_size,
                   grad_accum_steps=accum, global_batch_size=train.global_batch_size, total_steps=total_steps,
                   samples_per_epoch=samples, image_tokens=num_patches, kept_tokens=kept,
                   feature_caching=feature_caching, contrastive_batch_size=contrastive, static_packing=static)
