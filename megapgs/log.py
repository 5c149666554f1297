"""Logging set-up: rich, readable lines on rank 0; warnings and errors only on the other ranks."""
from __future__ import annotations

import logging
import os

from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=True)


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """open_clip logs its routine steps on the root logger at INFO: keep only its warnings."""
    return record.levelno >= logging.WARNING or f"{os.sep}open_clip{os.sep}" not in record.pathname


def setup_logging(level: str, rank: int) -> None:
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=True, markup=False)
    handler.addFilter(_quiet_libraries)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if rank else "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if rank == 0 else logging.WARNING)
