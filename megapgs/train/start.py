"""Where a run starts, decided once before anything heavy runs: a checkpoint to resume, the
`train.init_from` weights, or a fresh initialisation.

    train.resume finds a complete checkpoint   -> resume it (init_from is not read)
    else, train.init_from set                  -> those weights (their towers checked now)
    else                                       -> fresh weights from train.seed

A fresh start (train.resume: none) in an output directory that already holds complete checkpoints
is refused: it would overwrite and prune another run's checkpoints. Continue that run with
`--resume auto`, or choose another train.output_dir.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from megapgs.config import Config
from megapgs.models.archs import ArchSpec, get_arch
from megapgs.train.checkpoint import complete_checkpoints, find_resume

log = logging.getLogger(__name__)


class StartError(ValueError):
    """The run cannot start from what train.resume, train.init_from and train.output_dir say."""


@dataclass(frozen=True)
class StartPoint:
    resume_from: Path | None   # a complete checkpoint directory to restore
    init_from: str | None      # initial weights to load (only when nothing is resumed)


def weights_arch(path: str) -> ArchSpec:
    """The arch of an initial checkpoint or of a megapgs run/checkpoint, from its metadata alone."""
    from megapgs.convert.init_weights import ConversionError, init_arch

    try:
        return init_arch(path)
    except (FileNotFoundError, ConversionError) as err:
        raise StartError(f"train.init_from={path!r}: {err}") from None


def decide_start(cfg: Config) -> StartPoint:
    ckpt_dir = Path(cfg.train.output_dir) / "checkpoints"
    try:
        resume_from = find_resume(ckpt_dir, cfg.train.resume)
    except FileNotFoundError as err:
        raise StartError(str(err)) from None
    if resume_from is not None:
        if cfg.train.init_from:
            log.info("train.init_from not read: resuming from %s (train.resume=%s) restores the trained weights",
                     resume_from, cfg.train.resume)
        return StartPoint(resume_from, None)
    existing = complete_checkpoints(ckpt_dir)
    if existing:
        raise StartError(f"train.output_dir={cfg.train.output_dir!r} already holds checkpoints (newest "
                         f"{existing[-1].name}) and train.resume is 'none': continue that run with --resume auto, "
                         "or start afresh in another train.output_dir (a fresh run here would overwrite them)")
    if cfg.train.init_from:
        from megapgs.convert.init_weights import init_fit_error

        problem = init_fit_error(weights_arch(cfg.train.init_from), get_arch(cfg.model.arch))
        if problem:
            raise StartError(f"train.init_from={cfg.train.init_from!r} {problem}")
    return StartPoint(None, cfg.train.init_from)
