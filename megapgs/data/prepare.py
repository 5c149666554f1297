"""Make the configured data ready before a run: write the embedded default's shards, or find the
user's shards and eval set, and say how many samples there are.

The GPU loaders (DALI, nvJPEG) read checked shard indexes (`shard_index`): from the manifest that
`tools/index_shards.py` or `tools/make_shards.py` wrote, or, for shards given without one, from an
index the first rank of each node builds once (reused by later runs) while the node's other ranks
wait for its manifest file: no rank reads the whole data set, and no collective waits for hours.
The CPU loader needs no index (it checks samples as it reads them); it takes the sample count from a
manifest or `data.samples_per_epoch` and does without one otherwise.

On several ranks, the first rank of each node writes the embedded default's shards and the others
wait at a barrier.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import socket
import time
from dataclasses import dataclass
from hashlib import sha1
from pathlib import Path

import braceexpand

from megapgs.config import Config
from megapgs.data.fashion_mnist import locate_raw, prepare_fashion_mnist
from megapgs.data.faults import DataError
from megapgs.data.shard_index import IndexedShard, index_shards, read_index_manifest
from megapgs.data.shards import MANIFEST, read_manifest
from megapgs.dist import DistInfo

log = logging.getLogger(__name__)
__all__ = ["DataError", "DataPlan", "loader_backend", "prepare_data", "resolve_shards"]
WAIT_LOG_EVERY_S = 60.0
LARGE_SET = 2000  # shards: indexing more at start-up earns a warning


@dataclass(frozen=True)
class DataPlan:
    train_urls: tuple[str, ...]     # shard files or URLs, in order
    train_samples: int | None       # from the manifest; None when unknown
    eval_root: Path | None          # clip_benchmark webdataset layout: classnames.txt, test/*.tar
    eval_samples: int | None
    train_index: tuple[IndexedShard, ...] | None = None  # checked indexes (the GPU loaders need them)

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
    urls, samples, _ = resolve_shard_set(spec, key)
    return urls, samples


def resolve_shard_set(spec: str, key: str) -> tuple[tuple[str, ...], int | None, tuple[IndexedShard, ...] | None]:
    """(URLs, sample count, checked indexes when the manifest has them) of a manifest or brace pattern.
    Only the listing is looked at (one stat per shard), never the shards' contents."""
    index = None
    if spec.endswith(".json"):
        if not Path(spec).is_file():
            raise DataError(f"{key}: no manifest at {spec}")
        try:
            shards, trusted = read_index_manifest(Path(spec))
        except DataError as err:
            raise DataError(f"{key}: {err}") from None
        urls = tuple(shard.path for shard in shards)
        samples = sum(shard.samples for shard in shards)
        index = tuple(shards) if trusted else None
    else:
        urls, samples = tuple(braceexpand.braceexpand(spec)), None
    local = [url for url in urls if not _is_remote(url)]
    missing = [url for url in local if not Path(url).is_file()]
    if local and len(missing) == len(urls):
        raise DataError(f"{key}: none of the {len(urls)} shards of {spec!r} exists (first: {urls[0]})")
    if missing:
        log.warning("%s: %d of %d shards are missing (first: %s); the loader skips and counts them",
                    key, len(missing), len(urls), missing[0])
    return urls, samples, index


def loader_backend(cfg: Config, dist: DistInfo) -> str:
    """'dali', 'nvjpeg', 'wds' or 'synthetic' for this run on this device ('auto': DALI on a GPU when
    its package is installed; whether it loads and starts is tried when the loader is built)."""
    if cfg.data.source == "synthetic":
        return "synthetic"
    if cfg.data.loader == "auto":
        has_dali = importlib.util.find_spec("nvidia.dali") is not None
        return "dali" if dist.device.type == "cuda" and has_dali else "wds"
    if cfg.data.loader == "nvjpeg" and dist.device.type != "cuda":
        raise DataError("data.loader 'nvjpeg' decodes on a CUDA device; this run has none (use 'wds' or 'dali')")
    return cfg.data.loader


def index_folder(cfg: Config, urls: tuple[str, ...]) -> Path:
    """Where a run indexes shards given without a manifest: `data.index_dir`, else a folder beside the
    shards when it is writable, else one in the run's output folder; one sub-folder per shard list."""
    digest = sha1("\n".join(urls).encode()).hexdigest()[:12]
    if cfg.data.index_dir:
        return Path(cfg.data.index_dir) / digest
    beside = Path(os.path.commonpath([str(Path(u).resolve().parent) for u in urls])) / "megapgs-index"
    if _writable(beside):
        return beside / digest
    log.warning("data: %s is not writable; the shard index goes into the run's folder and is rebuilt by every "
                "new run: run tools/index_shards.py once and point data.train_shards at its manifest", beside.parent)
    return Path(cfg.train.output_dir) / "shard_index" / digest


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{socket.gethostname()}-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


def ensure_index(urls: tuple[str, ...], out_dir: Path, dist: DistInfo) -> tuple[IndexedShard, ...]:
    """The checked indexes of local `urls`: built by the first rank of each node (reusing what an
    earlier run indexed), waited for as a file by the node's other ranks."""
    remote = [u for u in urls if _is_remote(u)]
    if remote:
        raise DataError(f"data.train_shards: the GPU loaders read local shards (got {remote[0]}); index them "
                        "where they lie with tools/index_shards.py, or use data.loader 'wds'")
    failed = out_dir / f"index-failed-{socket.gethostname()}.txt"
    if dist.is_local_main:
        failed.unlink(missing_ok=True)
        if len(urls) > LARGE_SET:
            log.warning("data: indexing %d shards before step 1, on every node; for a set this size run "
                        "tools/index_shards.py once and point data.train_shards at its manifest.json", len(urls))
        processes = max(1, len(os.sched_getaffinity(0)))
        log.info("data: indexing %d shards into %s (%d processes; once: later runs reuse it)", len(urls), out_dir,
                 processes)
        try:
            index_shards(urls, out_dir, processes=processes, progress=dist.is_main)
        except BaseException as err:
            out_dir.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{type(err).__name__}: {err}\n")
            raise
    else:
        _wait_for_index(urls, out_dir, failed)
    shards, _ = read_index_manifest(out_dir / MANIFEST)
    return tuple(shards)


def _wait_for_index(urls: tuple[str, ...], out_dir: Path, failed: Path) -> None:
    """Until the node's first rank has written a manifest of exactly these shards, as they are now.
    The manifest is read again only when its file changes (one stat a second, not one per shard)."""
    started, last_log, started_wall = time.monotonic(), time.monotonic(), time.time()
    wanted = [str(Path(u).resolve()) for u in urls]
    manifest, seen = out_dir / MANIFEST, None
    while True:
        if failed.is_file() and failed.stat().st_mtime >= started_wall - 5:  # not a failure of an earlier run
            raise DataError(f"data: the first rank of this node could not index the shards: "
                            f"{failed.read_text().strip()}")
        try:
            stat = manifest.stat()
            version = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            version = None
        if version is not None and version != seen:
            seen = version
            if _manifest_lists(manifest, wanted):
                return
        if time.monotonic() - last_log > WAIT_LOG_EVERY_S:
            last_log = time.monotonic()
            log.info("data: waiting %.0f s for the first rank of this node to index the shards (%s)",
                     last_log - started, out_dir)
        time.sleep(1.0)


def _manifest_lists(manifest: Path, wanted: list[str]) -> bool:
    """Whether `manifest` indexes exactly the shards `wanted`, none changed since it was written (an
    earlier run's manifest of the same, unchanged shards is as good as the one being written)."""
    try:
        shards, _ = read_index_manifest(manifest)
    except DataError:
        return False
    return [s.path for s in shards] == wanted and not any(s.changed() == "shard_changed" for s in shards)


def _eval_set(root: Path, key: str, zeroshot: bool) -> int | None:
    """Check a clip_benchmark-style eval root and return its sample count when a manifest tells it.
    Zero-shot needs its classnames.txt; retrieval alone (clip_benchmark's retrieval layout: several
    captions per image, one per line, no class names) needs only test/*.tar."""
    if not (root / "test").is_dir() or not any((root / "test").glob("*.tar")):
        raise DataError(f"{key}: {root} is not an eval set (expected test/*.tar in clip_benchmark's "
                        "webdataset layout)")
    if zeroshot and not (root / "classnames.txt").is_file():
        kind = (root / "dataset_type.txt").read_text().strip() if (root / "dataset_type.txt").is_file() else ""
        raise DataError(f"{key}: {root} has no classnames.txt, which zero-shot classification needs"
                        + (" (it is a retrieval set: set eval.zeroshot=false)" if kind == "retrieval" else ""))
    manifest = root / "test" / MANIFEST
    return read_manifest(manifest)["samples"] if manifest.is_file() else None


def prepare_data(cfg: Config, dist: DistInfo) -> DataPlan:
    data = cfg.data
    index = None
    if data.source == "fashion_mnist":
        out_dir = Path(data.root) / "fashion_mnist"
        if dist.is_local_main:
            raw = locate_raw(Path(data.fashion_mnist_dir), Path(data.root) / "downloads")
            prepare_fashion_mnist(raw, out_dir, data.shard_size)
        dist.barrier()
        train_urls, train_samples, index = resolve_shard_set(str(out_dir / "train" / MANIFEST), "data.root")
        eval_root = Path(cfg.eval.shards) if cfg.eval.shards else out_dir
    elif data.source == "webdataset":
        assert data.train_shards is not None  # the schema requires it
        train_urls, train_samples, index = resolve_shard_set(data.train_shards, "data.train_shards")
        eval_root = Path(cfg.eval.shards) if cfg.eval.shards else None
    else:  # synthetic: nothing to read
        train_urls, train_samples = (), None
        eval_root = Path(cfg.eval.shards) if cfg.eval.shards else None
    if train_urls and index is None and loader_backend(cfg, dist) in ("dali", "nvjpeg"):
        index = ensure_index(train_urls, index_folder(cfg, train_urls), dist)
        train_samples = train_samples or sum(shard.samples for shard in index)
    if data.samples_per_epoch is not None:
        train_samples = data.samples_per_epoch
    if not (cfg.eval.zeroshot or cfg.eval.retrieval):  # no evaluation: its shards are not read, nor checked
        eval_root = None
    eval_samples = _eval_set(eval_root, "eval.shards", cfg.eval.zeroshot) if eval_root is not None else None
    return DataPlan(train_urls, train_samples, eval_root, eval_samples, index)
