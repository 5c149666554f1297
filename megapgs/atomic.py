"""Files written so that a crash never leaves a half-written one under the final name."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Callable


def temporary_sibling(path: Path) -> Path:
    """A hidden name beside `path` no other writer uses: processes on different hosts sharing a file
    system can have the same PID, so the host name is part of it."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes a temporary sibling of `path`; it is flushed to disk and renamed into
    place, so `path` is either the old file or the whole new one."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, payload: dict) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1) + "\n"))
