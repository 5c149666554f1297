"""Which loader feeds a run: the configured source and back-end, built for this rank.

    fashion_mnist / webdataset  ->  DALI (data.loader dali, or auto on a GPU with DALI installed),
                                    torchvision nvJPEG (nvjpeg, GPU only),
                                    or webdataset + PIL (wds, or auto otherwise)
    synthetic                   ->  random tensors made on the device (model throughput alone)

Synthetic samples are keyed by their index in the global stream, so runs with different numbers
of ranks or accumulation steps see the same samples in each step (the invariance checks).
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Iterator

import torch

from megapgs.config import Config
from megapgs.data.prepare import DataPlan
from megapgs.dist import DistInfo
from megapgs.train.plan import RunPlan

log = logging.getLogger(__name__)


class EndlessFullBatches:
    """Epoch after epoch of a loader whose iteration is one epoch (DALI, nvJPEG), full batches
    only: every rank gathers the same number of rows. Its position is only the epoch count: a
    resumed run starts a fresh pass in a fresh order, so samples of the interrupted epoch may
    repeat or be missed (exact resume is the webdataset loader's; DALI's checkpointing is not
    wired in yet)."""

    def __init__(self, loader, batch_size: int):
        self.loader, self.batch_size = loader, batch_size
        self.samples_per_epoch = loader.samples_per_epoch
        self.skips = loader.skips
        self.epochs_started = 0

    def __iter__(self) -> Iterator:
        while True:
            self.epochs_started += 1
            for batch in self.loader:
                if len(batch.keys) == self.batch_size:
                    yield batch

    def state_dict(self) -> dict:
        return {"format": "megapgs-epochs/1", "epoch": max(self.epochs_started - 1, 0)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != "megapgs-epochs/1":
            log.warning("data: the checkpoint's loader position is from another loader; starting a fresh pass")
            return
        log.warning("data: this loader cannot resume inside an epoch: epoch %d starts afresh, in a new order",
                    state["epoch"])
        self.epochs_started = int(state["epoch"])


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` on the training device without waiting for it: a copy from pageable host memory
    synchronises the stream first, so host tensors are pinned (PyTorch's caching host allocator
    keeps the pinned buffer alive until the copy is done) and copied asynchronously."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, dtype, non_blocking=True)


def loader_backend(cfg: Config, dist: DistInfo) -> str:
    """'dali', 'wds' or 'synthetic' for this run on this device."""
    if cfg.data.source == "synthetic":
        return "synthetic"
    if cfg.data.loader == "auto":
        has_dali = importlib.util.find_spec("nvidia.dali") is not None
        return "dali" if dist.device.type == "cuda" and has_dali else "wds"
    if cfg.data.loader == "nvjpeg" and dist.device.type != "cuda":
        raise ValueError("data.loader 'nvjpeg' decodes on a CUDA device; this run has none (use 'wds' or 'dali')")
    return cfg.data.loader


def build_loader(cfg: Config, data: DataPlan, plan: RunPlan, dist: DistInfo, tokenizer):
    backend = loader_backend(cfg, dist)
    image_size = plan.arch.vision.image_size
    common = dict(image_size=image_size, tokenizer=tokenizer, batch_size=plan.micro_batch_size,
                  rank=dist.rank, world_size=dist.world_size, seed=cfg.train.seed)
    log.info("data: %s loader", backend)
    if backend == "synthetic":
        from megapgs.data.synthetic import build_synthetic_loader

        # 4 global batches of distinct samples, however the batch is split (invariance checks)
        return build_synthetic_loader(batch_size=plan.micro_batch_size, image_size=image_size,
                                      context_length=plan.arch.text.context_length, device=dist.device,
                                      seed=cfg.train.seed, rank=dist.rank, world_size=dist.world_size,
                                      distinct_samples=4 * plan.global_batch_size)
    if backend == "dali":
        from megapgs.data.dali import build_dali_loader

        return EndlessFullBatches(build_dali_loader(cfg.data, list(data.train_urls), device=dist.device, **common),
                                  plan.micro_batch_size)
    if backend == "nvjpeg":
        from megapgs.data.nvjpeg import build_nvjpeg_loader

        return EndlessFullBatches(build_nvjpeg_loader(cfg.data, list(data.train_urls), device=dist.device, **common),
                                  plan.micro_batch_size)
    from megapgs.data.wds import build_train_loader

    return build_train_loader(cfg.data, list(data.train_urls), **common)
