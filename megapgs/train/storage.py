"""Where a run writes, and the two ways that can fail for reasons outside the run: an output
directory that cannot be created or written, and a disk that fills.

`prepare_output_dir` runs on every rank before anything heavy (each rank writes its own checkpoint
files); it creates train.output_dir and writes a probe file into it, or raises OutputDirError naming
the directory, the cause and the free space of the file system it would be on. A checkpoint write
that runs out of space raises DiskFullError (megapgs/train/checkpoint.py) naming the last complete
checkpoint, which `latest` still points to; the half-written one is removed.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from megapgs.atomic import temporary_sibling

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how torch.save (its C++ zip writer) reports a short write, the form a full disk takes there
TORCH_SHORT_WRITE = ("unexpected pos", "file write failed", "No space left on device")


class OutputDirError(OSError):
    """train.output_dir cannot be created or written."""


class DiskFullError(OSError):
    """The disk filled while the run wrote to it."""


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def nearest_existing(path: Path) -> Path:
    """`path`, or the closest of its parents that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_space(path: Path) -> str:
    """'X free of Y on the file system holding <dir>' for `path` or its nearest existing parent."""
    where = nearest_existing(path)
    try:
        usage = shutil.disk_usage(where)
    except OSError as err:
        return f"free space unknown ({err.strerror} for {where})"
    return f"{human_bytes(usage.free)} free of {human_bytes(usage.total)} on the file system holding {where}"


def is_out_of_space(err: BaseException) -> bool:
    """Whether a write failed because the disk (or the quota) is full."""
    if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in TORCH_SHORT_WRITE)


def prepare_output_dir(output_dir: str) -> Path:
    """Create train.output_dir and check that a file can be written into it; OutputDirError otherwise."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = temporary_sibling(path / "write-probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        cause = err.strerror or str(err)
        failed = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
        raise OutputDirError(
            f"train.output_dir={output_dir!r} cannot be used: {cause}{failed}; {free_space(path)}. Choose a directory "
            "this user can create and write, on a disk with room for the checkpoints, with --set "
            "train.output_dir=PATH") from None
    return path


def disk_full_message(what: str, where: Path, err: BaseException, last_complete: Path | None) -> str:
    """The message of a write that ran out of space: what failed, the free space, the way out."""
    detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[0]
    if last_complete is not None:
        resume = (f"The last complete checkpoint is {last_complete} (`latest` points to it): free some space, or move "
                  "the run directory to a larger disk, and continue with --resume auto.")
    else:
        resume = "There is no complete checkpoint yet: free some space and start the run again."
    return f"{what} ran out of disk space ({detail}); {free_space(where)}. {resume}"
