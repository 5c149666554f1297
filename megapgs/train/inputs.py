"""Which loader feeds a run: the configured source and back-end, built for this rank.

    fashion_mnist / webdataset  ->  DALI (data.loader dali, or auto on a GPU with DALI installed),
                                    torchvision nvJPEG (nvjpeg, GPU only),
                                    or webdataset + PIL (wds, or auto otherwise)
    synthetic                   ->  random tensors made on the device (model throughput alone)

`auto` falls back to webdataset + PIL, with one warning that says why, when DALI is installed but
cannot load or start here (a driver too old for its CUDA, say); a DALI asked for by name fails.

Synthetic samples are keyed by their index in the global stream, so runs with different numbers
of ranks or accumulation steps see the same samples in each step (the invariance checks).
"""
from __future__ import annotations

import logging
from typing import Iterator

import torch

from megapgs.config import Config
from megapgs.data.prepare import DataError, DataPlan, loader_backend
from megapgs.dist import DistInfo
from megapgs.train.plan import RunPlan

log = logging.getLogger(__name__)


class EndlessFullBatches:
    """Epoch after epoch of a loader whose iteration is one epoch (nvJPEG), full batches only:
    every rank gathers the same number of rows. Its position is only the epoch count: a resumed run
    starts a fresh pass in a fresh order, so samples of the interrupted epoch may repeat or be missed
    (exact resume is the webdataset and DALI loaders')."""

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

    def load_other_world_states(self, states: list[dict], samples_seen: int) -> None:
        """Resume from a run on len(states) ranks (megapgs/train/reshard.py): as on the same ranks,
        the newest epoch starts afresh, in a new order."""
        epochs = [int(state["epoch"]) for state in states if state.get("format") == "megapgs-epochs/1"]
        self.epochs_started = max(epochs, default=0)
        log.warning("data: the checkpoint was written by %d rank(s), this run has %d: epoch %d starts afresh, in a "
                    "new order", len(states), self.loader.world_size, self.epochs_started)


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` on the training device without waiting for it: a copy from pageable host memory
    synchronises the stream first, so host tensors are pinned (PyTorch's caching host allocator
    keeps the pinned buffer alive until the copy is done) and copied asynchronously."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, dtype, non_blocking=True)


def build_loader(cfg: Config, data: DataPlan, plan: RunPlan, dist: DistInfo, tokenizer):
    backend = loader_backend(cfg, dist)
    image_size = plan.arch.vision.image_size
    common = dict(image_size=image_size, tokenizer=tokenizer, batch_size=plan.micro_batch_size,
                  rank=dist.rank, world_size=dist.world_size, seed=cfg.train.seed)
    if backend == "synthetic":
        log.info("data: synthetic loader")
        from megapgs.data.synthetic import build_synthetic_loader

        # 4 global batches of distinct samples, however the batch is split (invariance checks)
        return build_synthetic_loader(batch_size=plan.micro_batch_size, image_size=image_size,
                                      context_length=plan.arch.text.context_length, device=dist.device,
                                      seed=cfg.train.seed, rank=dist.rank, world_size=dist.world_size,
                                      distinct_samples=4 * plan.global_batch_size)
    if backend == "dali":
        try:
            from megapgs.data.dali import build_dali_loader

            loader = build_dali_loader(cfg.data, data.train_index or (), device=dist.device, **common)
            loader.probe()
            log.info("data: DALI loader (%s decoding)", loader.device)
            return loader
        except DataError:
            raise  # the data, not the library: the same on any loader
        except (ImportError, OSError, RuntimeError) as err:  # the library or the driver
            if cfg.data.loader != "auto":
                raise
            log.warning("data: DALI is installed but cannot run here (%s: %s); data.loader auto falls back to the "
                        "webdataset + PIL loader", type(err).__name__, str(err).strip().splitlines()[0][:300])
    if backend == "nvjpeg":
        from megapgs.data.nvjpeg import build_nvjpeg_loader

        log.info("data: nvJPEG loader")
        return EndlessFullBatches(build_nvjpeg_loader(cfg.data, data.train_index or (), device=dist.device, **common),
                                  plan.micro_batch_size)
    from megapgs.data.wds import build_train_loader

    if backend == "wds" and cfg.data.loader == "auto" and dist.device.type == "cuda":
        log.warning("data: DALI is not installed, so data.loader auto reads with webdataset + PIL, decoding on the "
                    "CPU, which may not keep the GPU busy: pip install -r requirements-gpu.txt (or set "
                    "data.loader=wds to choose it)")
    log.info("data: webdataset + PIL loader")
    return build_train_loader(cfg.data, list(data.train_urls), samples_per_epoch=data.train_samples, **common)
