"""Reading checkpoint files without running code from them.

`torch.load` unpickles, and a crafted pickle runs any code as it loads. megapgs's own files load
with `weights_only=True` (tensors, numbers, strings, plain containers). DeepSpeed's loaders
(`engine.load_checkpoint`, `zero_to_fp32`) unpickle with `weights_only=False`, and their files hold
a few DeepSpeed types besides tensors. So before a DeepSpeed loader opens a checkpoint directory,
`vet_checkpoint_dir` opens every .pt file in it once with `weights_only=True`, allowing only those
DeepSpeed types (`DEEPSPEED_TYPES`), memory-mapped so only the pickle itself is read, not the
tensors. A file that needs anything else is refused with an error that names the file and the
global it asked for; nothing from it has run.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file asks to unpickle something other than tensors and plain data."""


def deepspeed_types() -> list[type]:
    """The non-tensor types DeepSpeed 0.19 writes into its checkpoint files (ZeRO stages 0-3,
    fp32/bf16/fp16): plain data holders, no code runs when they are rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: Path, *, allow: list[type] | None = None, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, with `allow` as the only extra types; a
    refused file raises UnsafeCheckpointError naming it and what it asked for."""
    try:
        with torch.serialization.safe_globals(allow or []):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        wanted = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(err))
        what = f"it asks for {wanted.group(1)}" if wanted else "it holds more than tensors and plain data"
        raise UnsafeCheckpointError(
            f"{path}: refused to load, {what}: unpickling it could run code, and megapgs only reads "
            "checkpoints of tensors and plain data (a file you trust can be converted with DeepSpeed's "
            "zero_to_fp32.py by hand)") from None


def vet_checkpoint_dir(path: Path) -> None:
    """Open every .pt file of a checkpoint directory with `weights_only=True` (DeepSpeed's types
    allowed) before DeepSpeed unpickles them without that guard."""
    allow = deepspeed_types()
    for file in sorted(Path(path).glob("*.pt")):
        try:
            load_weights_only(file, allow=allow, mmap=True)
        except RuntimeError as err:
            if isinstance(err, UnsafeCheckpointError) or "mmap" not in str(err):
                raise
            load_weights_only(file, allow=allow)  # a file in torch's legacy format cannot be mapped
