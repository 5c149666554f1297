"""One optimizer step: A micro-batches per rank -> (PGS, forward, loss, backward) -> engine.step.

How the contrastive loss meets gradient accumulation (`train.contrastive_batch`):

- `global` (default): the loss sees the whole global batch, W x A x B pairs, whatever the
  accumulation: feature caching, as GradCache and OpenCLIP's accum_freq. Pass 1 runs every
  micro-batch forward without gradients (drawing its PGS masks) and keeps its features; the loss of
  the whole batch is taken once on them, with its gradient with respect to each feature (and the
  logit scale, SigLIP's bias). Pass 2 runs each micro-batch again, with gradients and the same
  masks, and back-propagates <its features, their gradient> (the scale's 1/A in each): exactly its
  share of the global gradient; the shares add up to the gradient of the global loss. These are
  whole-batch gradients, not micro-batch means, so DeepSpeed's division by the accumulation count
  is off (`scale_wrt_gas=False`). Cost: one more forward per micro-batch, and the A micro-batches
  held on the device at once.
- `micro_batch`: each micro-batch's own loss over its W x B pairs, averaged over the A micro-batches
  by DeepSpeed: fewer negatives (the run's header says how many), one pass.

With A = 1 the two are the same single pass. DeepSpeed's accumulation boundary is its own: every
backward is followed by `engine.step()`, which steps the optimizer on the A-th. Nothing here reads
a value back from the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple

import torch

from megapgs.config import Config
from megapgs.dist import DistInfo
from megapgs.perf.timers import StageTimer
from megapgs.pgs.keyed_random import SampleKeyedDraws
from megapgs.pgs.pack import PatchMasker
from megapgs.pgs.selection import pgs_generator
from megapgs.train.loss import ContrastiveLoss
from megapgs.train.plan import RunPlan


@dataclass
class MicroBatch:
    images: torch.Tensor            # (B, 3, H, W) on the device, compute dtype
    tokens: torch.Tensor            # (B, C) on the device
    text_lengths: list[int]         # host: tokens up to each EOT
    keep: object | None             # the tower's keep function (PatchMasker); None: unmasked
    keys: tuple[str, ...] = ()      # host: the samples' keys (the window's samples checksum)


class StepOutput(NamedTuple):
    loss: torch.Tensor              # 0-d on the device: the step's loss (global batch, or mean of micro-batches)
    logit_scale: torch.Tensor       # 0-d on the device


class TimedMasker:
    """PatchMasker that records the PGS stage's time (its first call: the selection; a feature
    cache's second pass only packs again, inside the forward) and exposes its selection."""

    def __init__(self, masker: PatchMasker, timer: StageTimer):
        self.masker, self.timer = masker, timer

    def __call__(self, images, cls, tokens):
        if self.masker.selection is not None:
            return self.masker(images, cls, tokens)
        self.timer.start("pgs")
        out = self.masker(images, cls, tokens)
        self.timer.stop("pgs")
        return out

    @property
    def selection(self):
        return self.masker.selection


def pgs_masker(cfg: Config, plan: RunPlan, dist: DistInfo, step: int, micro: int, progress: float,
               timer: StageTimer) -> TimedMasker:
    """The keep function of micro-batch `micro` of `step` on this rank: its masks drawn per (seed,
    step, rank), or keyed by each sample's place in the step's global batch (`pgs.rng: sample`)."""
    if cfg.pgs.rng == "rank":
        generator = pgs_generator(cfg.train.seed, step * plan.grad_accum_steps + micro, dist.rank, dist.device)
    else:
        first_sample = (micro * dist.world_size + dist.rank) * plan.micro_batch_size
        generator = SampleKeyedDraws(cfg.train.seed, step, first_sample)
    masker = PatchMasker(cfg.pgs, plan.arch.vision.patch_size, progress, generator, static=plan.static_packing)
    return TimedMasker(masker, timer)


class TrainStep:
    def __init__(self, engine, loss_fn: ContrastiveLoss, feature_caching: bool, timer: StageTimer):
        self.engine, self.loss_fn, self.feature_caching, self.timer = engine, loss_fn, feature_caching, timer

    def __call__(self, micro_batches: Iterable[MicroBatch]) -> StepOutput:
        """Run one optimizer step over the micro-batches (all A of them: DeepSpeed counts)."""
        if self.feature_caching:
            return self._with_feature_cache(micro_batches)
        return self._one_pass(micro_batches)

    def _forward(self, mb: MicroBatch):  # engine forward: PGS + both towers
        return self.engine(mb.images, mb.tokens, mb.text_lengths, mb.keep)

    def _backward_and_step(self, objective: torch.Tensor, scale_wrt_gas: bool) -> None:
        self.timer.start("backward")
        self.engine.backward(objective, scale_wrt_gas=scale_wrt_gas)
        self.timer.stop("backward")
        self.timer.start("optimizer")
        self.engine.step()  # the optimizer steps on the A-th call only
        self.timer.stop("optimizer")

    def _one_pass(self, micro_batches: Iterable[MicroBatch]) -> StepOutput:
        total, count = None, 0
        for mb in micro_batches:
            self.timer.start("forward")
            out = self._forward(mb)
            self.timer.stop("forward")
            self.timer.start("loss")
            result = self.loss_fn(out.image, out.text, out.logit_scale, out.logit_bias)
            self.timer.stop("loss")
            self._backward_and_step(result.objective, scale_wrt_gas=True)  # DeepSpeed averages the A losses
            total = result.loss if total is None else total + result.loss
            count += 1
        if count == 0:
            raise ValueError("a step needs at least one micro-batch")
        return StepOutput(total / count, out.logit_scale.detach())

    def _with_feature_cache(self, micro_batches: Iterable[MicroBatch]) -> StepOutput:
        # pass 1: every micro-batch's features without gradients (and its PGS masks), each batch
        # computed as soon as the loader hands it over
        taken, cached = [], []
        for mb in micro_batches:  # loading it is the loader's time (its own stage), not the cache's
            taken.append(mb)
            self.timer.start("feature_cache")
            with torch.no_grad():
                cached.append(self._forward(mb))
            self.timer.stop("feature_cache")
        if not taken:
            raise ValueError("a step needs at least one micro-batch")
        # the loss of the whole batch, once, and its gradient with respect to the cached features
        # and the logit scale (and bias)
        self.timer.start("feature_cache")
        leaves = [torch.cat([out.image for out in cached]), torch.cat([out.text for out in cached]),
                  cached[-1].logit_scale]
        if cached[-1].logit_bias is not None:
            leaves.append(cached[-1].logit_bias)
        leaves = [leaf.detach().requires_grad_() for leaf in leaves]
        result = self.loss_fn(*leaves[:3], leaves[3] if len(leaves) > 3 else None)
        grads = torch.autograd.grad(result.objective, leaves)
        self.timer.stop("feature_cache")
        # pass 2: each micro-batch again, with gradients and the same masks; the backward of
        # <features, d loss / d features> gives exactly its share of the global gradient
        rows = 0
        for mb in taken:
            self.timer.start("forward")
            out = self._forward(mb)  # mb.keep packs the masks pass 1 drew
            self.timer.stop("forward")
            B = out.image.shape[0]
            share = ((out.image * grads[0][rows:rows + B]).sum() + (out.text * grads[1][rows:rows + B]).sum()
                     + (out.logit_scale * grads[2]).sum() / len(taken))
            if out.logit_bias is not None:
                share = share + (out.logit_bias * grads[3]).sum() / len(taken)
            rows += B
            self._backward_and_step(share, scale_wrt_gas=False)
        return StepOutput(result.loss, out.logit_scale.detach())
