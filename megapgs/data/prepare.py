"""Make the configured data ready before a run: write the embedded default's shards, or find the
user's shards and eval set, and say how many samples there are.

On several ranks, the first rank of each node prepares and the others wait at a barrier.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from megapgs.config import Config
from megapgs.data.fashion_mnist import locate_raw, prepare_fashion_mnist
from megapgs.data.faults import DataError
from megapgs.data.shards import MANIFEST, read_manifest
from megapgs.dist import DistInfo

log = logging.getLogger(__name__)
__all__ = ["DataError", "DataPlan", "prepare_data", "resolve_shards"]


@dataclass(frozen=True)
class DataPlan:
    train_urls: tuple[str, ...]     # shard files or URLs, in order
    train_samples: int | None       # from the manifest; None when unknown
    eval_root: Path | None          # clip_benchmark webdataset layout: classnames.txt, test/*.tar
    eval_samples: int | None

    def describe(self) -> str:
        train = f"{self.train_samples:,} train samples" if self.train_samples else "train samples: unknown count"
        text = f"{train} in {len(self.train_urls)} shards" if self.train_urls else "synthetic data"
        if self.eval_root is not None:
            count = f"{self.eval_samples:,}" if self.eval_samples else "an unknown number of"
            text += f"; {count} held-out samples in {self.eval_root}"
        return text


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def resolve_shards(spec: str, key: str) -> tuple[tuple[str, ...], int | None]:
    """Shard URLs and sample count from a manifest .json or a brace pattern of .tar files."""
    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"{key}: no manifest at {spec}")
        try:
            manifest = read_manifest(path)
        except ValueError as err:
            raise DataError(f"{key}: {err}") from None
        urls = tuple(shard["path"] for shard in manifest["shards"])
        samples = manifest["samples"]
    else:
        urls, samples = tuple(braceexpand.braceexpand(spec)), None
    local = [url for url in urls if not _is_remote(url)]
    missing = [url for url in local if not Path(url).is_file()]
    if local and len(missing) == len(urls):
        raise DataError(f"{key}: none of the {len(urls)} shards of {spec!r} exists (first: {urls[0]})")
    if missing:
        log.warning("%s: %d of %d shards are missing (first: %s); the loader skips and counts them",
                    key, len(missing), len(urls), missing[0])
    return urls, samples


def _eval_set(root: Path, key: str) -> int | None:
    """Check a clip_benchmark-style eval root and return its sample count when a manifest tells it."""
    if not (root / "classnames.txt").is_file() or not (root / "test").is_dir():
        raise DataError(f"{key}: {root} is not an eval set (expected classnames.txt and test/*.tar "
                        "in clip_benchmark's webdataset layout)")
    manifest = root / "test" / MANIFEST
    return read_manifest(manifest)["samples"] if manifest.is_file() else None


def prepare_data(cfg: Config, dist: DistInfo) -> DataPlan:
    data = cfg.data
    if data.source == "fashion_mnist":
        out_dir = Path(data.root) / "fashion_mnist"
        if dist.is_local_main:
            raw = locate_raw(Path(data.fashion_mnist_dir), Path(data.root) / "downloads")
            prepare_fashion_mnist(raw, out_dir, data.shard_size)
        dist.barrier()
        train_urls, train_samples = resolve_shards(str(out_dir / "train" / MANIFEST), "data.root")
        eval_root = Path(cfg.eval.shards) if cfg.eval.shards else out_dir
    elif data.source == "webdataset":
        assert data.train_shards is not None  # the schema requires it
        train_urls, train_samples = resolve_shards(data.train_shards, "data.train_shards")
        eval_root = Path(cfg.eval.shards) if cfg.eval.shards else None
    else:  # synthetic: nothing to read
        train_urls, train_samples = (), None
        eval_root = Path(cfg.eval.shards) if cfg.eval.shards else None
    if data.samples_per_epoch is not None:
        train_samples = data.samples_per_epoch
    if not (cfg.eval.zeroshot or cfg.eval.retrieval):  # no evaluation: its shards are not read, nor checked
        eval_root = None
    eval_samples = _eval_set(eval_root, "eval.shards") if eval_root is not None else None
    return DataPlan(train_urls, train_samples, eval_root, eval_samples)
