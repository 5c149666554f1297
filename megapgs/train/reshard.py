"""Resuming a checkpoint on another number of ranks.

A checkpoint written by W ranks continues on W' ranks with its weights, optimizer state, step,
learning rate (a function of the step) and samples seen:

- ZeRO-1/2/3 checkpoints hold each rank's partition of the optimizer state (and, under ZeRO-3, of
  the weights) in files of their own. They are converted once, by global rank 0, with DeepSpeed's
  Universal Checkpointing (`deepspeed.checkpoint.ds_to_universal`: one file per parameter and
  optimizer moment, whole) into `<checkpoint>/universal/`, which the engine then loads with
  `checkpoint.load_universal` and re-partitions over its own ranks. The conversion is written to a
  temporary directory and renamed into place, so a kill leaves no half-converted checkpoint; a later
  resume on yet another world size reuses it. Checkpoints must lie on a file system every node
  sees (as DeepSpeed's own checkpointing assumes).
- ZeRO-0 checkpoints hold whole weights and optimizer state in one file: they load as they are.
- The data position is dealt anew (`load_other_world_states` of each loader): the synthetic stream
  continues at the next global sample exactly; the shard loaders, whose shards are split over the
  ranks, start the epoch after the newest any old rank was in (with a warning), since the sample a
  rank would read next is not defined across splits. Each old rank's skip counts go to new rank
  (old rank mod W'), so their sum over the ranks is kept.
- Per-rank random number generator states are not restored (they belong to old ranks); megapgs's
  masking and synthetic data draw from per-sample keys, not from them.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from megapgs.dist import DistInfo, any_rank
from megapgs.train.checkpoint import COMPLETE
from megapgs.train.safe_load import load_weights_only, vet_checkpoint_dir

log = logging.getLogger(__name__)

UNIVERSAL = "universal"   # <checkpoint>/universal: the Universal Checkpoint made from it
CONVERTED = "CONVERTED"   # written last into it: the conversion is complete


class ReshardError(RuntimeError):
    """A checkpoint could not be converted or read for another number of ranks."""


def saved_world_size(path: Path) -> int:
    return int(json.loads((path / COMPLETE).read_text())["world_size"])


def zero_partitioned(path: Path) -> bool:
    """Whether the checkpoint's optimizer state is cut into per-rank ZeRO partitions (stages 1-3)."""
    return any(path.glob("*_optim_states.pt"))


def needs_universal(path: Path, world_size: int) -> bool:
    """Whether resuming `path` on `world_size` ranks goes through a Universal Checkpoint."""
    return saved_world_size(path) != world_size and zero_partitioned(path)


def _converted(folder: Path) -> bool:
    return (folder / CONVERTED).is_file()


def convert_to_universal(path: Path) -> Path:
    """`<path>/universal`, made by DeepSpeed's ds_to_universal unless a complete one is there already."""
    folder = path / UNIVERSAL
    if _converted(folder):
        return folder
    vet_checkpoint_dir(path)  # ds_to_universal unpickles DeepSpeed's files without torch's guard
    for stale in path.glob(f"{UNIVERSAL}.tmp-*"):  # a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)      # an incomplete one
    tmp = path / f"{UNIVERSAL}.tmp-{socket.gethostname()}-{os.getpid()}"
    workers = str(max(1, min(8, os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
           "--output_folder", str(tmp), "--num_extract_workers", workers, "--num_merge_workers", workers,
           "--inject_missing_state"]  # ZeRO-1/2: the version record DeepSpeed asks of Megatron-style clients
    log.info("converting %s (written by %d ranks) to a DeepSpeed Universal Checkpoint in %s",
             path, saved_world_size(path), folder)
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise ReshardError(f"DeepSpeed's ds_to_universal could not convert {path} (exit code "
                           f"{result.returncode}); resume on the {saved_world_size(path)} ranks that wrote it. "
                           f"Its output ended:\n{tail}")
    (tmp / CONVERTED).write_text(json.dumps({"from": str(path), "seconds": round(time.perf_counter() - started, 1)}))
    tmp.rename(folder)
    log.info("universal checkpoint ready in %.1f s", time.perf_counter() - started)
    return folder


def universal_checkpoint(path: Path, dist: DistInfo) -> Path:
    """The Universal Checkpoint of `path`, converted by global rank 0 while the others wait; every
    rank fails together (with rank 0's reason there) rather than some waiting forever."""
    folder, error = path / UNIVERSAL, None
    if dist.is_main:
        try:
            folder = convert_to_universal(path)
        except (ReshardError, OSError, RuntimeError) as err:
            error = err
    if any_rank(error is not None, dist):
        if error is not None:
            raise error if isinstance(error, ReshardError) else ReshardError(f"converting {path}: {error}") from error
        raise ReshardError(f"rank 0 could not convert {path} for {dist.world_size} ranks (its log says why)")
    if not _converted(folder):
        raise ReshardError(f"{folder} was converted by rank 0 but is not visible on this node: checkpoints must "
                           "lie on a file system every node shares")
    zero = folder / "zero"
    for part in (folder, zero, *sorted(p for p in zero.iterdir() if p.is_dir())):
        vet_checkpoint_dir(part)
    return folder


@contextmanager
def universal_load_repaired(zero_optimizer) -> Iterator[None]:
    """Undoes two things DeepSpeed 0.19's ZeRO-3 Universal Checkpoint loader
    (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`) does to the optimizer:
    - it copies the first saved param group's hyperparameters into every group, which would put
      weight decay on the group that has none (biases, norms, embeddings: engine.param_groups);
    - it gives every sub-group's state the same `step` tensor, which the fused AdamW then advances
      once per group and step, so the bias corrections run ahead (the loss curve drifted by 3e-3
      within 5 steps of a resume on 1 rank of a 2-rank checkpoint)."""
    kept = [{k: v for k, v in group.items() if k != "params"} for group in zero_optimizer.param_groups]
    yield
    if len(zero_optimizer.param_groups) != len(kept):
        raise ReshardError(f"the optimizer has {len(zero_optimizer.param_groups)} param groups after loading the "
                           f"universal checkpoint, {len(kept)} before")
    for group, settings in zip(zero_optimizer.param_groups, kept):
        group.update(settings)
    for state in getattr(zero_optimizer, "optimizer", zero_optimizer).state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def old_rank_payloads(path: Path) -> list[dict]:
    """Every old rank's megapgs state (step, data position, RNG), in rank order."""
    payloads = []
    for rank in range(saved_world_size(path)):
        file = path / f"megapgs_rank{rank}.pt"
        if not file.is_file():
            raise ReshardError(f"{file} is missing: the checkpoint holds no data position of its rank {rank}")
        payloads.append(load_weights_only(file))
    return payloads
