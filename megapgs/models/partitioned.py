"""Parameters that may be ZeRO-3 partitions: built under `deepspeed.zero.Init`, each module's own
parameters are cut into per-rank shards as soon as its constructor returns, so a parent that sets
its children's values afterwards (an init scheme, loaded weights) must gather them first, change
them on every rank alike, and let DeepSpeed re-partition them (rank 0's values are kept).

Outside zero.Init (ZeRO 0-2, or ZeRO-3 with model.partitioned_init off) these are no-ops."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's whole shape (a partitioned one's own tensor is empty)."""
    return param.ds_shape if is_partitioned(param) else param.shape


@contextlib.contextmanager
def modifying(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Within: the whole values of `params`, to set (every rank sets them alike; rank 0's are kept)."""
    params = list(params)
    if not any(is_partitioned(p) for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for p in params if is_partitioned(p)], modifier_rank=0):
        yield
