"""/dev/shm: what megapgs keeps out of it, and what dead runs left there.

DeepSpeed's torch comm backend (`deepspeed/comm/torch.py`, `TorchBackend.__init__`) builds its
`deepspeed_shm_comm` C++ op with ninja in every process whose DeepSpeed accelerator is the CPU
(CUDA's has no such op) when it joins a process group, and when
`LOCAL_SIZE` equals the world size (DeepSpeed's own launcher exports it) each rank creates a 69 MB
`/dev/shm/deepspeed_allreduce_buffer_{uid}_{master addr}_{master port}_{rank}` that nothing ever
unlinks (`shm.cpp` has `shared_close` but no caller). The op serves `inference_all_reduce` only,
which training never calls (megapgs's collectives go through megapgs/dist.py, DeepSpeed's through
torch.distributed). So megapgs does not build it: `disable_deepspeed_shm_op` before DeepSpeed's
comm backend starts. That also takes the op's JIT build off every CPU run: ~/.cache/torch_extensions
is shared by every install of the user, each install's build command differs (its paths), so each
rebuilds it when another built it last: a C++ compile of about 70 s of both cores on a 2-core
machine, 11 minutes measured while another install rebuilt it in turn (BENCHMARKS.md).

A run killed with SIGKILL runs no handler, and files from before this (or from other DeepSpeed and
Python multiprocessing programs of the same user: `sem.mp-*`, the named semaphores of spawn and
forkserver pools, which their resource tracker unlinks only if it outlives them) stay.
`sweep_stale_files` removes those it can prove dead: owned by this user, named by those libraries,
and neither mapped nor open in any process this one can see (/proc/*/maps and /proc/*/fd: the
owner of a live buffer or semaphore keeps it mapped from creation to exit). The first rank of each
node runs it when the run starts.
"""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# names the libraries give what they leave: DeepSpeed's all-reduce buffers, Python's named semaphores
STALE_PATTERNS = ("deepspeed_allreduce_buffer_{uid}_*", "sem.mp-*")


def disable_deepspeed_shm_op() -> None:
    """DeepSpeed's comm backend starts without its shared-memory op (and so builds nothing and
    creates no /dev/shm buffer); `inference_all_reduce` then falls back to torch.distributed."""
    # the module itself: `import deepspeed.comm.torch as m` gives torch (the package re-exports that name)
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = _no_shm_op


def _no_shm_op():
    return None


def _paths_in_use(candidates: set[str]) -> set[str]:
    """The candidates some visible process maps or holds open."""
    in_use: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].removesuffix(" (deleted)") in candidates:
                    in_use.add(fields[5].removesuffix(" (deleted)"))
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target in candidates:
                    in_use.add(target)
        except OSError:  # the process ended, or is not ours to read
            continue
    return in_use


def stale_files(shm_dir: Path = SHM_DIR) -> list[Path]:
    """This user's DeepSpeed buffers and Python semaphores in `shm_dir` that no process uses."""
    uid = os.getuid()
    candidates: dict[str, Path] = {}
    for pattern in STALE_PATTERNS:
        for path in shm_dir.glob(pattern.format(uid=uid)):
            try:
                if path.is_file() and path.stat().st_uid == uid:
                    candidates[str(path)] = path
            except OSError:
                continue
    in_use = _paths_in_use(set(candidates)) if candidates else set()
    return sorted(path for name, path in candidates.items() if name not in in_use)


def sweep_stale_files(shm_dir: Path = SHM_DIR) -> list[Path]:
    """Remove `stale_files`; returns what was removed (and logs it once)."""
    removed, freed = [], 0
    for path in stale_files(shm_dir):
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:  # gone meanwhile, or not ours to remove after all
            continue
        removed.append(path)
        freed += size
    if removed:
        log.info("removed %d file(s) of dead runs from %s (%.1f MB): %s", len(removed), shm_dir, freed / 2**20,
                 ", ".join(p.name for p in removed[:3]) + (", ..." if len(removed) > 3 else ""))
    return removed
