"""Who this process is: rank, world size and device, from the launcher's environment.

`deepspeed`, `torchrun` and Slurm (through our launch script) all export RANK, LOCAL_RANK and
WORLD_SIZE; a plain `python pretrain.py` has none of them and is rank 0 of 1. The process group is
created through DeepSpeed (gloo on CPU, nccl on GPU) so that the engine finds it ready.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed() -> DistInfo:
    """Read the launcher's environment and, with more than one rank, join the process group."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch.distributed.is_initialized():
        import deepspeed  # slow to import; only multi-process runs need it here

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
