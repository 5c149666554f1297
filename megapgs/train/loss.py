"""Contrastive losses over the global batch: CLIP's InfoNCE and SigLIP's sigmoid loss.

Features are gathered from every rank. The loss and its gradient equal those of one process
holding the whole global batch, whatever the number of ranks (DeepSpeed averages gradients
over ranks; `objective` is what to call backward on, `loss` the value to report):

- gather_with_grad, global loss: every rank computes the full loss; autograd through the gather
  sums the W identical gradients of each rank's features, and the rank average divides by W.
- gather_with_grad + local_loss: rank r computes its rows' loss (image rows against all texts,
  text rows against all images); the global loss is the mean over ranks.
- no gather_with_grad (OpenCLIP's default): other ranks' features are constants, so each rank
  gets only its own features' share of the gradient: the objective is W x the loss, with the
  logit scale's gradient divided by W (every rank sees all of the scale's gradient).
local_loss without gather_with_grad would drop other ranks' rows from the gradient: the
config rejects it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megapgs.dist import DistInfo, all_gather_rows, mean_over_ranks


@dataclass(frozen=True)
class LossResult:
    loss: torch.Tensor            # 0-d: the global batch's loss (the same value on every rank)
    objective: torch.Tensor       # 0-d: call backward on this; rank-averaged grads = the global ones


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 for the logits (bf16 features from the towers); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class ContrastiveLoss:
    def __init__(self, kind: str, local_loss: bool, gather_with_grad: bool, dist: DistInfo):
        if kind not in ("clip", "siglip"):
            raise ValueError(f"unknown loss {kind!r}; allowed: clip, siglip")
        if local_loss and not gather_with_grad and dist.world_size > 1:
            raise ValueError("local_loss needs gather_with_grad: otherwise the gradient misses other ranks' rows")
        self.kind, self.local_loss, self.gather_with_grad = kind, local_loss, gather_with_grad
        self.dist, self.rank, self.world_size = dist, dist.rank, dist.world_size

    def __call__(self, image_BE: torch.Tensor, text_BE: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor | None = None) -> LossResult:
        """Unit-norm features of this rank's micro-batch (B, E); the scale (and SigLIP's bias)."""
        W, B = self.world_size, image_BE.shape[0]
        # SigLIP always takes rows against all columns, so it needs the gradient through the gather.
        with_grad = self.gather_with_grad or self.kind == "siglip"
        all_image = all_gather_rows(image_BE, self.dist, with_grad)
        all_text = all_gather_rows(text_BE, self.dist, with_grad)
        if self.kind == "siglip":
            if logit_bias is None:
                raise ValueError("the SigLIP loss needs the model's logit_bias")
            logits = logit_scale * _wide(image_BE) @ _wide(all_text).t() + logit_bias       # (B, W*B)
            signs = -torch.ones_like(logits)
            signs[:, self.rank * B:(self.rank + 1) * B].fill_diagonal_(1.0)
            rows_loss = -F.logsigmoid(signs * logits).sum() / B
            global_loss = mean_over_ranks(rows_loss, self.dist)
            return LossResult(global_loss.detach(), global_loss)
        if self.local_loss or W == 1:
            labels = torch.arange(B, device=image_BE.device) + self.rank * B
            per_image = logit_scale * _wide(image_BE) @ _wide(all_text).t()                 # (B, W*B)
            per_text = logit_scale * _wide(text_BE) @ _wide(all_image).t()
            rows_loss = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
            global_loss = mean_over_ranks(rows_loss, self.dist)
            return LossResult(global_loss.detach(), global_loss)
        if not self.gather_with_grad:  # value unchanged, gradient / W: undone by the x W below
            logit_scale = logit_scale / W + (logit_scale - logit_scale / W).detach()
        logits = logit_scale * _wide(all_image) @ _wide(all_text).t()                       # (W*B, W*B)
        labels = torch.arange(W * B, device=image_BE.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        return LossResult(loss.detach(), loss if self.gather_with_grad else loss * W)
