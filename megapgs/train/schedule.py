"""Learning rate and training progress as functions of the optimizer step.

Both are pure functions of the step, so a resumed run needs no scheduler state: the step in the
checkpoint is enough. Progress also sets PGS's weight of token similarity (PGS.md step 3).
"""
from __future__ import annotations

import math

from megapgs.config import OptimConfig, PGSConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to cfg.lr over
    cfg.warmup_steps steps (OpenCLIP's: lr (step+1)/warmup), then cosine down to
    cfg.min_lr_ratio * lr at the last step, or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    done = min(step - cfg.warmup_steps, decay_steps) / decay_steps
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * done))


def progress_at(step: int, total_steps: int) -> float:
    """Completed share of training before step `step`, in [0, 1]."""
    return min(max(step / max(total_steps, 1), 0.0), 1.0)


def masking_at(step: int, total_steps: int, cfg: PGSConfig) -> bool:
    """Whether step `step` masks image tokens: the configured masking, except in the unmasked tail
    (the last `unmasked_tail` share of the steps, so the towers end on the full sequences that
    evaluation and inference see)."""
    if cfg.masking == "none":
        return False
    return step < total_steps - round(cfg.unmasked_tail * total_steps)
