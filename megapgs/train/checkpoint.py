"""Checkpoints: DeepSpeed's (sharded under ZeRO-3) plus megapgs's own state, written so that a
crash at any moment leaves a usable checkpoint.

    <output_dir>/checkpoints/step_00000400/     DeepSpeed's files for tag step_00000400
                             step_00000400/megapgs_rank{r}.pt   per rank: step, data position, RNG
                             step_00000400/COMPLETE             written last, by rank 0, after all ranks
                             step_00000400/universal/           made on a resume on another number of
                                                                ranks (megapgs/train/reshard.py)
                             latest                             the newest complete tag (atomic replace)

A checkpoint counts only once COMPLETE exists; `--resume auto` takes the newest complete one
and ignores a half-written directory (a kill during save). Every file megapgs writes goes to a
temporary name first and is renamed into place. Old checkpoints beyond `keep_last` are removed
only after the new one is complete.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megapgs.atomic import write_atomically
from megapgs.dist import DistInfo
from megapgs.train.safe_load import load_weights_only, vet_checkpoint_dir
from megapgs.train.storage import DiskFullError, disk_full_message, is_out_of_space

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
TAG_PREFIX = "step_"


@dataclass(frozen=True)
class TrainState:
    step: int                      # optimizer steps completed
    samples_seen: int              # global samples consumed
    loader: dict[str, Any] | None  # this rank's data position (TrainLoader.state_dict())
    # a checkpoint of another number of ranks: every old rank's loader state, in rank order
    other_world_loaders: list[dict[str, Any] | None] | None = None


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def _rng_state() -> dict[str, Any]:
    """Plain tensors and numbers only, so the file loads with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_resume(ckpt_dir: Path, resume: str) -> Path | None:
    """The checkpoint directory to resume from: none, the newest complete one (auto), or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(ckpt_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"train.resume={resume!r}: no complete megapgs checkpoint there "
                                f"(a directory with a {COMPLETE} file, e.g. {ckpt_dir / tag_for(400)})")
    return path


def save_checkpoint(engine, ckpt_dir: Path, state: TrainState, dist: DistInfo, keep_last: int,
                    config_json: str) -> Path:
    """Write a checkpoint on every rank; returns its directory once it is complete. A rank whose
    disk fills raises DiskFullError (its launcher then stops the other ranks): the half-written
    checkpoint is removed and `latest` stays on the previous one."""
    tag = tag_for(state.step)
    path = ckpt_dir / tag
    payload = {"step": state.step, "samples_seen": state.samples_seen, "loader": state.loader,
               "rng": _rng_state(), "world_size": dist.world_size}
    with _space_checked(ckpt_dir, path):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
        write_atomically(path / f"megapgs_rank{dist.rank}.pt", lambda tmp: torch.save(payload, tmp))
    dist.barrier()  # every rank's files are in place before the checkpoint is declared complete
    if dist.is_main:
        marker = {"step": state.step, "samples_seen": state.samples_seen, "world_size": dist.world_size,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": json.loads(config_json)}
        with _space_checked(ckpt_dir, path):
            write_atomically(path / COMPLETE, lambda tmp: tmp.write_text(json.dumps(marker, indent=1)))
        write_atomically(ckpt_dir / "latest", lambda tmp: tmp.write_text(tag))
        _prune(ckpt_dir, keep_last)
    dist.barrier()
    return path


@contextmanager
def _space_checked(ckpt_dir: Path, path: Path):
    """Turns a write that ran out of space into DiskFullError naming the last complete checkpoint,
    after removing the half-written `path` (which frees what it took)."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not is_out_of_space(err):
            raise
        shutil.rmtree(path, ignore_errors=True)
        complete = complete_checkpoints(ckpt_dir)
        raise DiskFullError(disk_full_message(f"writing checkpoint {path}", ckpt_dir, err,
                                              complete[-1] if complete else None)) from None


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    complete = complete_checkpoints(ckpt_dir)
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    newest = complete[-1].name
    for leftover in ckpt_dir.iterdir():  # half-written checkpoints older than the newest complete one
        if leftover.is_dir() and leftover.name.startswith(TAG_PREFIX) and leftover.name < newest \
                and not (leftover / COMPLETE).exists():
            shutil.rmtree(leftover, ignore_errors=True)


def load_checkpoint(engine, path: Path, dist: DistInfo) -> TrainState:
    """Restore the engine (weights, optimizer, ZeRO shards) and this rank's state from `path`.
    DeepSpeed unpickles its files without torch's weights-only guard: they are vetted first. A
    checkpoint of another number of ranks goes through megapgs/train/reshard.py (the engine was
    built with `checkpoint.load_universal` when its ZeRO partitions need converting)."""
    from megapgs.train import reshard

    vet_checkpoint_dir(path)
    marker = json.loads((path / COMPLETE).read_text())
    load_dir, tag = path.parent, path.name
    resharded = marker["world_size"] != dist.world_size
    old_loaders = [payload["loader"] for payload in reshard.old_rank_payloads(path)] if resharded else None
    universal = engine.load_universal_checkpoint()  # decided when the engine was built (loop.py)
    if universal:
        load_dir, tag = path, reshard.universal_checkpoint(path, dist).name
    with reshard.universal_load_repaired(engine.optimizer) if universal else contextlib.nullcontext():
        loaded, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
    if loaded is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint at {path}")
    log.info("resumed from %s (step %d, %s samples seen)", path, marker["step"], f"{marker['samples_seen']:,}")
    if resharded:
        log.warning("checkpoint %s was written by %d rank(s), this run has %d: weights, optimizer state, step and "
                    "learning rate continue; the data position is dealt anew (megapgs/train/reshard.py)",
                    path, marker["world_size"], dist.world_size)
        return TrainState(marker["step"], marker["samples_seen"], None, other_world_loaders=old_loaders)
    payload = load_weights_only(path / f"megapgs_rank{dist.rank}.pt")
    _set_rng_state(payload["rng"])
    return TrainState(marker["step"], marker["samples_seen"], payload["loader"])
