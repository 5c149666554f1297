"""The CPU loader: webdataset shards -> PIL decoding -> OpenCLIP transforms -> token ids, in
`data.workers` processes per rank.

What each rank reads (non-resampled). Epoch e permutes the shard list with a seed drawn from
(seed, e); rank r takes every world_size-th shard of that order from r, and its worker w every
`workers`-th of those from w. A worker streams its shards' samples in tar order through a shuffle
buffer of `data.shuffle_buffer` samples (seeded by seed, e, rank, worker), then decodes, checks
and transforms them (the crop drawn from seed, e, rank, worker and the sample's place in the
stream) and batches them. So every readable sample comes once per epoch across all ranks.
A worker's stream runs on from one epoch into the next, so every batch is full; `Batch.epochs`
tells which epoch each sample belongs to. Resampled: each worker draws its shards with
replacement (seeded per rank and worker), as many per epoch as it would read without.

Exact resume. A worker's stream is a pure function of (seed, rank, worker, epoch) and its place
in it, so the loader's state is where each worker stood after its last delivered batch: (epoch,
samples taken out of the shuffle buffer). DataLoader takes batches from its workers in strict
turn, and the state says whose turn is next. Restarting with the same shards, seed, ranks and
workers, each worker replays its epoch up to that place by reading tar members without decoding
them, and the loader delivers exactly the batches an uninterrupted run would have delivered
(resampled mode too). With a different count of ranks, workers or shards the old places mean
nothing; the loader then starts every worker at the epoch after the furthest one (no sample is
repeated; the rest of the interrupted epoch is not seen) and says so.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle

from megapgs.config import DataConfig
from megapgs.data.faults import (DataError, FruitlessReads, SkipCounter, check_caption, decode_image, image_member,
                                 skips_of_old_ranks)
from megapgs.data.shards import read_shard
from megapgs.data.transforms import derive_seed, eval_pixels, normalize, train_pixels

log = logging.getLogger(__name__)
STATE_FORMAT = "megapgs-wds-loader/1"


@dataclass
class Batch:
    """One micro-batch on the CPU (or, after `.to`, on the device)."""
    images: torch.Tensor                # (B, 3, H, W) float32, normalised
    tokens: torch.Tensor                # (B, C) int64
    text_lengths: list[int]             # tokens up to and including EOT, host ints
    keys: list[str]
    epochs: list[int] = field(default_factory=list)  # the epoch each sample belongs to

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return replace(self, images=self.images.to(device, non_blocking=non_blocking),
                       tokens=self.tokens.to(device, non_blocking=non_blocking))


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to produce its stream (picklable)."""
    shards: tuple[str, ...]
    rank: int
    world_size: int
    workers: int                       # logical workers of this rank (>= 1)
    seed: int
    resampled: bool
    shuffle_buffer: int
    batch_size: int
    image_size: int
    augment: bool
    crop_scale: tuple[float, float]


def _share(count: int, index: int, parts: int) -> int:
    """How many of `count` items position-striding by `parts` from `index` takes."""
    return len(range(index, count, parts))


def rank_epoch_shards(count: int, rank: int, world_size: int, seed: int, epoch: int) -> list[int]:
    """Which of `count` shards rank `rank` reads in `epoch` (non-resampled), in reading order: every
    W-th of a permutation drawn from (seed, epoch), the same on every rank and every loader."""
    order = list(range(count))
    random.Random(derive_seed(seed, "shards", epoch)).shuffle(order)
    return order[rank::world_size]


def epoch_shards(spec: StreamSpec, epoch: int, worker: int) -> list[str]:
    """The shards worker `worker` of rank `spec.rank` reads in `epoch`, in reading order."""
    rank_count = _share(len(spec.shards), spec.rank, spec.world_size)
    count = _share(rank_count, worker, spec.workers)
    if spec.resampled:
        rng = random.Random(derive_seed(spec.seed, "resampled", spec.rank, worker, epoch))
        return [rng.choice(spec.shards) for _ in range(max(count, 1))]
    mine = rank_epoch_shards(len(spec.shards), spec.rank, spec.world_size, spec.seed, epoch)
    return [spec.shards[i] for i in mine[worker::spec.workers]]


def _raw_samples(shards: list[str], skips: SkipCounter, fruitless: FruitlessReads) -> Iterator[dict]:
    for shard in shards:
        yield from read_shard(shard, skips)
        fruitless.shard_read(shard)


def _collate(pixels: list[torch.Tensor], captions: list[str], keys: list[str], epochs: list[int],
             tokenizer) -> dict:
    tokens_BC, lengths = tokenizer(captions)
    return {"images": normalize(pixels), "tokens": tokens_BC, "text_lengths": lengths,
            "keys": keys, "epochs": epochs}


def worker_stream(spec: StreamSpec, tokenizer, worker: int, start: tuple[int, int]) -> Iterator[dict]:
    """Endless batches of logical worker `worker`, from `start` = (epoch, samples already taken
    out of its shuffle buffer in that epoch). Each item is a collated batch plus `worker`,
    `position` (where the worker stands after it) and `skips` ({epoch: counts} since the
    previous item)."""
    skips = SkipCounter()                  # this epoch's skips not yet shipped with a batch
    unshipped: dict[int, dict[str, int]] = {}  # earlier epochs' skips not yet shipped
    fruitless = FruitlessReads(spec.shards)
    epoch, fast_forward = start
    pixels: list[torch.Tensor] = []
    captions: list[str] = []
    keys: list[str] = []
    epochs: list[int] = []
    while True:
        samples = _raw_samples(epoch_shards(spec, epoch, worker), skips, fruitless)
        if spec.shuffle_buffer > 0:
            rng = random.Random(derive_seed(spec.seed, "samples", spec.rank, worker, epoch))
            samples = _shuffle(samples, bufsize=spec.shuffle_buffer, initial=spec.shuffle_buffer, rng=rng)
        for taken, sample in enumerate(samples):
            if taken < fast_forward:  # resuming: this sample went into an earlier, delivered batch
                if taken == fast_forward - 1:  # and the skips so far were shipped with those batches
                    skips.take()
                    fruitless.good_sample()
                continue
            caption, reason = check_caption(sample.get("txt"))
            image = None
            if reason is None:
                image, reason = decode_image(image_member(sample))
            if reason is not None:
                skips.add(reason, f"{sample['__key__']} in {sample['__url__']}")
                continue
            fruitless.good_sample()
            if spec.augment:
                crop_rng = random.Random(derive_seed(spec.seed, "crop", spec.rank, worker, epoch, taken))
                pixels.append(train_pixels(image, spec.image_size, spec.crop_scale, crop_rng))
            else:
                pixels.append(eval_pixels(image, spec.image_size))
            captions.append(caption)
            keys.append(sample["__key__"])
            epochs.append(epoch)
            if len(keys) == spec.batch_size:
                batch = _collate(pixels, captions, keys, epochs, tokenizer)
                shipped, unshipped = {**unshipped, epoch: skips.take()}, {}
                yield {**batch, "worker": worker, "position": (epoch, taken + 1), "skips": shipped}
                pixels, captions, keys, epochs = [], [], [], []
        unshipped[epoch] = skips.take()
        fruitless.epoch_done(SkipCounter(_sum_counts(unshipped.values())))
        epoch, fast_forward = epoch + 1, 0


def _sum_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total = SkipCounter()
    for one in counts:
        total.merge(one)
    return total.counts


class _RankStream(IterableDataset):
    """One DataLoader's dataset: physical worker i plays logical worker (i + first) % workers."""

    def __init__(self, spec: StreamSpec, tokenizer, starts: list[tuple[int, int]], first: int):
        self.spec, self.tokenizer, self.starts, self.first = spec, tokenizer, starts, first

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.first) % self.spec.workers
        return worker_stream(self.spec, self.tokenizer, worker, self.starts[worker])


def _as_is(item):  # the workers collate; DataLoader must not (a module-level function: picklable)
    return item


class TrainLoader:
    """Endless `Batch`es of one rank. `skips` holds the skip counts of the delivered batches,
    merged over workers (all-reduce them over ranks with `skips.all_reduced()`)."""

    def __init__(self, spec: StreamSpec, tokenizer, samples_per_epoch: int | None, timeout_s: float, processes: int):
        self.spec, self.tokenizer, self.timeout_s = spec, tokenizer, timeout_s
        self.processes = processes          # DataLoader worker processes: 0 (read in this process) or spec.workers
        self.samples_per_epoch = samples_per_epoch   # the whole set's samples (all ranks), when known
        self.skips = SkipCounter()          # all delivered batches' skips
        self.skips_by_epoch: dict[int, SkipCounter] = {}  # complete for epochs < min(position epochs)
        self.positions: list[tuple[int, int]] = [(0, 0)] * spec.workers  # per logical worker
        self.next_worker = 0
        self.batches = 0
        self._epoch_logged = 0

    def __iter__(self) -> Iterator[Batch]:
        """Batches from the current position on. Each new iteration restarts the workers from
        where the last delivered batch left them (so `load_state_dict` goes before iterating)."""
        processes = self.processes
        dataset = _RankStream(self.spec, self.tokenizer, list(self.positions), self.next_worker)
        loader = DataLoader(
            dataset, batch_size=None, num_workers=processes, collate_fn=_as_is,
            timeout=self.timeout_s if processes else 0, pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.spec.seed),  # leave the global RNG alone
            prefetch_factor=2 if processes else None, persistent_workers=False)
        items = iter(loader)
        try:
            while True:
                try:
                    item = next(items)
                except RuntimeError as err:
                    if "DataLoader timed out" in str(err):
                        raise DataError(f"data.timeout_s: no batch from the loader workers in {self.timeout_s:g} s "
                                        f"(rank {self.spec.rank}); is the shard storage reachable?") from None
                    raise
                self._account(item)
                yield Batch(images=item["images"], tokens=item["tokens"], text_lengths=item["text_lengths"],
                            keys=item["keys"], epochs=item["epochs"])
        finally:  # stop the workers now, not when the garbage collector finds the iterator
            shutdown = getattr(items, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _account(self, item: dict) -> None:
        self.positions[item["worker"]] = tuple(item["position"])
        self.next_worker = (item["worker"] + 1) % self.spec.workers
        self.batches += 1
        for epoch, counts in item["skips"].items():
            self.skips.merge(counts)
            self.skips_by_epoch.setdefault(int(epoch), SkipCounter()).merge(counts)
        while self._epoch_logged < min(position[0] for position in self.positions):
            done = self.skips_by_epoch.get(self._epoch_logged, SkipCounter())
            done.log_summary(log, prefix=f"data: rank {self.spec.rank}, epoch {self._epoch_logged}")
            self._epoch_logged += 1

    def state_dict(self) -> dict:
        spec = self.spec
        return {"format": STATE_FORMAT, "seed": spec.seed, "rank": spec.rank, "world_size": spec.world_size,
                "workers": spec.workers, "shards": len(spec.shards), "resampled": spec.resampled,
                "shuffle_buffer": spec.shuffle_buffer, "positions": [list(p) for p in self.positions],
                "next_worker": self.next_worker, "batches": self.batches, "skips": dict(self.skips.counts),
                "skips_by_epoch": {str(e): dict(c.counts) for e, c in self.skips_by_epoch.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a CPU loader state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        spec = self.spec
        now = {"seed": spec.seed, "rank": spec.rank, "world_size": spec.world_size, "workers": spec.workers,
               "shards": len(spec.shards), "resampled": spec.resampled, "shuffle_buffer": spec.shuffle_buffer}
        changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        self.skips = SkipCounter(state["skips"])
        self.skips_by_epoch = {int(e): SkipCounter(c) for e, c in state.get("skips_by_epoch", {}).items()}
        self.batches = int(state["batches"])
        if not changed:
            self.positions = [tuple(p) for p in state["positions"]]
            self.next_worker = int(state["next_worker"])
        else:
            epoch = max(p[0] for p in state["positions"]) + 1
            self.positions = [(epoch, 0)] * spec.workers
            self.next_worker = 0
            log.warning("data: the loader state was saved with %s; resuming at the start of epoch %d "
                        "instead of the exact place", ", ".join(f"{k}={a} (now {b})" for k, (a, b) in changed.items()),
                        epoch)
        self._epoch_logged = min(p[0] for p in self.positions)

    def load_other_world_states(self, states: list[dict], samples_seen: int) -> None:
        """Resume from a run on len(states) ranks (megapgs/train/reshard.py): the shards are split
        anew, so this rank starts the epoch after the newest any old rank was in."""
        spec = self.spec
        epoch = max(p[0] for state in states for p in state["positions"]) + 1
        self.skips = skips_of_old_ranks([s["skips"] for s in states], spec.rank, spec.world_size)
        mine = states[spec.rank::spec.world_size]
        epochs = {e for state in mine for e in state.get("skips_by_epoch", {})}
        self.skips_by_epoch = {int(e): SkipCounter.summed(s["skips_by_epoch"][e] for s in mine if e in s.get(
            "skips_by_epoch", {})) for e in epochs}
        self.positions, self.next_worker = [(epoch, 0)] * spec.workers, 0
        self.batches = samples_seen // (spec.batch_size * spec.world_size)
        self._epoch_logged = epoch
        warn_split_anew(len(states), spec.world_size, epoch, samples_seen)


def warn_split_anew(old_world_size: int, world_size: int, epoch: int, samples_seen: int) -> None:
    log.warning("data: the checkpoint was written by %d rank(s), this run has %d: the shards are split anew and "
                "every rank starts epoch %d (%s samples seen so far)", old_world_size, world_size, epoch,
                f"{samples_seen:,}")


def build_train_loader(cfg: DataConfig, shards: Sequence[str], *, image_size: int, tokenizer, batch_size: int,
                       rank: int, world_size: int, seed: int, samples_per_epoch: int | None = None) -> TrainLoader:
    """The CPU training loader of one rank over `shards` (`DataPlan.train_urls`); `samples_per_epoch`:
    the set's size when a manifest or the config tells it (nothing is counted here)."""
    if not shards:
        raise DataError("data.train_shards: no shards to read")
    rank_shards = _share(len(shards), rank, world_size)
    if rank_shards == 0 and not cfg.resampled:
        raise DataError(f"data.train_shards: {len(shards)} shards cannot feed {world_size} ranks (each rank "
                        "needs one per epoch); write smaller shards or set data.resampled: true")
    workers = max(1, min(cfg.workers, rank_shards))
    if cfg.workers > workers:
        log.info("data: rank %d reads %d shards per epoch; using %d loader workers, not %d",
                 rank, rank_shards, workers, cfg.workers)
    spec = StreamSpec(shards=tuple(str(s) for s in shards), rank=rank, world_size=world_size, workers=workers,
                      seed=seed, resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer, batch_size=batch_size,
                      image_size=image_size, augment=cfg.augment, crop_scale=tuple(cfg.crop_scale))
    samples = cfg.samples_per_epoch or samples_per_epoch
    return TrainLoader(spec, tokenizer, samples, cfg.timeout_s, processes=workers if cfg.workers else 0)
