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
and neither mapped nor open in any process this one can see (the file's inode in /proc/*/maps or
behind /proc/*/fd: the owner of a live buffer or semaphore keeps it mapped or open from creation to
exit; processes in another PID namespace sharing this /dev/shm are not seen). The first rank of each
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


def _in_use(keys: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """The (device, inode) pairs among `keys` that a visible process maps or holds open. By inode, not
    by name: glibc's sem_open creates a semaphore under a temporary name, maps it and only then links
    it to its name, so its creator's /proc/PID/maps shows the temporary name, deleted."""
    found: set[tuple[int, int]] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                fields = line.split(maxsplit=5)  # address perms offset major:minor inode [path]
                if len(fields) < 5 or fields[4] == "0":
                    continue
                major, minor = (int(part, 16) for part in fields[3].split(":"))
                key = (os.makedev(major, minor), int(fields[4]))
                if key in keys:
                    found.add(key)
            for fd in (proc / "fd").iterdir():
                try:
                    stat = os.stat(fd)
                except OSError:
                    continue
                if (stat.st_dev, stat.st_ino) in keys:
                    found.add((stat.st_dev, stat.st_ino))
        except (OSError, ValueError):  # the process ended, or is not ours to read
            continue
    return found


def stale_files(shm_dir: Path = SHM_DIR) -> list[Path]:
    """This user's DeepSpeed buffers and Python semaphores in `shm_dir` that no process uses."""
    uid = os.getuid()
    candidates: dict[tuple[int, int], Path] = {}
    for pattern in STALE_PATTERNS:
        for path in shm_dir.glob(pattern.format(uid=uid)):
            try:
                stat = path.lstat()
            except OSError:
                continue
            if stat.st_uid == uid and path.is_file() and not path.is_symlink():
                candidates[(stat.st_dev, stat.st_ino)] = path
    in_use = _in_use(set(candidates)) if candidates else set()
    return sorted(path for key, path in candidates.items() if key not in in_use)


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
