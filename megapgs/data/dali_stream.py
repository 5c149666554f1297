"""The encoded samples one rank reads with DALI, window by window, and where it stands in them.

Which shards (from the manifest, `shard_index.IndexedShard`): without resampling, epoch e permutes
the shard list with a seed drawn from (seed, e) and rank r takes every W-th shard of that order from
r, so every shard is read once per epoch by one rank. With resampling, rank r draws its shards with
replacement from the whole list, window by window. Either way the rank holds at most
`data.dali_window_shards` shards in one DALI reader at a time, and builds a new reader for the next
window: host memory (DALI parses a window's indexes, about 300 bytes a sample, and maps its tars)
does not grow with the data set.

Where a rank stands (`Position`): the epoch, the window, DALI's own checkpoint of the window's
reader taken just before the reader batch that holds the next sample, and how many samples of that
batch were already delivered. A resumed run rebuilds that window's reader from the checkpoint
(DALI fast-forwards without reading images) and drops the delivered samples: it continues with the
samples the uninterrupted run would have read. The reader's shuffle and the shard orders are pure
functions of (seed, rank, epoch, window).

A thread reads ahead (`ReaderThread`): it runs the reader, checks each caption, tokenises the batch
and hands over (encoded images as DALI's own TensorList, keys, tokens, provenance), so the training
thread does none of this per-sample work.
"""
from __future__ import annotations

import atexit
import base64
import logging
import queue
import random
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def

from megapgs.data.faults import IMAGE_EXTS, DataError, SkipCounter, check_caption
from megapgs.data.shard_index import IndexedShard, split_name
from megapgs.data.transforms import derive_seed
from megapgs.data.wds import rank_epoch_shards

log = logging.getLogger(__name__)
Tokenizer = Callable[[list[str]], tuple[torch.Tensor, list[int]]]
EMPTY_WINDOWS_LIMIT = 64  # windows in a row without a readable sample before the data counts as unreadable


@dataclass(frozen=True)
class Position:
    """Where a rank's stream stands: the next sample is `offset` samples into reader batch `batch`
    of the window, which the window's reader returns next when restored from `checkpoint` (None:
    built afresh, at the window's start)."""
    epoch: int = 0
    window: int = 0
    batch: int = 0
    checkpoint: bytes | None = None
    offset: int = 0

    @property
    def inside_window(self) -> bool:
        return self.batch > 0 or self.offset > 0

    def to_state(self) -> dict:
        return {"epoch": self.epoch, "window": self.window, "batch": self.batch, "offset": self.offset,
                "checkpoint": base64.b64encode(self.checkpoint).decode() if self.checkpoint else None}

    @staticmethod
    def from_state(state: dict) -> Position:
        checkpoint = base64.b64decode(state["checkpoint"]) if state.get("checkpoint") else None
        return Position(int(state["epoch"]), int(state["window"]), int(state["batch"]), checkpoint,
                        int(state["offset"]))


@dataclass
class ReaderBatch:
    """One batch of the window's reader, as the reader thread hands it over."""
    images: object                    # DALI TensorListCPU of encoded images (the reader's own output)
    keys: list[str]
    tokens: torch.Tensor              # (n, C) int64
    lengths: list[int]
    valid: list[bool]                 # False: padding past the window's end, or a caption found bad
    epoch: int
    window: int
    batch: int                        # its place in the window
    checkpoint: bytes | None          # the reader's state just before this batch (None: the window's start)
    skips: dict[str, int] = field(default_factory=dict)  # the window's open-time skips, on its first batch


@dataclass(frozen=True)
class StreamSpec:
    shards: tuple[IndexedShard, ...]
    rank: int
    world_size: int
    seed: int
    resampled: bool
    window_shards: int
    shuffle_buffer: int
    batch_size: int
    threads: int

    def fingerprint(self) -> dict:
        """What a saved position depends on: resuming with another value starts a fresh epoch."""
        return {"shards": len(self.shards), "rank": self.rank, "world_size": self.world_size, "seed": self.seed,
                "resampled": self.resampled, "window_shards": self.window_shards,
                "shuffle_buffer": self.shuffle_buffer, "batch_size": self.batch_size}


def epoch_windows(spec: StreamSpec, epoch: int) -> list[list[int]] | None:
    """This rank's windows of `epoch` (shard indices), or None when resampled (endless windows)."""
    if spec.resampled:
        return None
    mine = rank_epoch_shards(len(spec.shards), spec.rank, spec.world_size, spec.seed, epoch)
    return [mine[i:i + spec.window_shards] for i in range(0, len(mine), spec.window_shards)]


def resampled_window(spec: StreamSpec, window: int) -> list[int]:
    rng = random.Random(derive_seed(spec.seed, "resampled", spec.rank, window))
    return [rng.randrange(len(spec.shards)) for _ in range(spec.window_shards)]


@pipeline_def(enable_checkpointing=True)
def _reader_pipeline(paths, index_paths, shuffle_buffer):
    images, captions = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=[";".join(IMAGE_EXTS), "txt"],
        missing_component_behavior="error", random_shuffle=shuffle_buffer > 0, initial_fill=max(shuffle_buffer, 1),
        pad_last_batch=True, stick_to_shard=True, name="reader")
    return images, captions, fn.get_property(images, key="source_info")    # "tar:offset:member"


def open_window(spec: StreamSpec, indices: list[int]) -> tuple[list[IndexedShard], SkipCounter]:
    """The window's shards that can be read as indexed, and the skips of opening it: each shard's
    index-time skips, and shards that vanished or changed since they were indexed (a stat each)."""
    skips = SkipCounter()
    readable = []
    for i in indices:
        shard = spec.shards[i]
        for reason, count in shard.skips.items():
            for _ in range(count):
                skips.add(reason, where=shard.path)
        reason = shard.changed()
        if reason:
            skips.add(reason, where=shard.path, detail="re-run tools/index_shards.py" if reason == "shard_changed"
                      else "")
        elif shard.samples and shard.index is not None:
            readable.append(shard)
    return readable, skips


def read_window(spec: StreamSpec, tokenizer: Tokenizer, epoch: int, window: int, indices: list[int],
                start: Position | None, stop: threading.Event) -> Iterator[ReaderBatch]:
    """The reader batches of one window: from its beginning, or from `start` (a position inside it).
    The last batch holds padding past the window's samples (`valid` False)."""
    shards, skips = open_window(spec, indices)
    if start is not None and start.inside_window:
        skips = SkipCounter()  # resuming inside the window: its open-time skips were delivered before
    total = sum(shard.samples for shard in shards)
    if not total:
        if skips.total:  # nothing to read, but skips to deliver
            yield ReaderBatch(None, [], torch.zeros(0, 1, dtype=torch.int64), [], [], epoch, window, 0, None,
                              skips.counts)
        return
    batches = -(-total // spec.batch_size)
    first = start.batch if start is not None else 0
    seed = derive_seed(spec.seed, "window reader", spec.rank, epoch, window) % 2**31
    pipe = _reader_pipeline(paths=[s.path for s in shards], index_paths=[str(s.index) for s in shards],
                            shuffle_buffer=spec.shuffle_buffer, batch_size=spec.batch_size,
                            num_threads=spec.threads, device_id=None, seed=seed, prefetch_queue_depth=2,
                            checkpoint=start.checkpoint if start is not None else None)
    pipe.build()
    try:
        for batch in range(first, batches):
            if stop.is_set():
                return
            before = start.checkpoint if batch == first and start is not None else (
                pipe.checkpoint() if batch > 0 else None)
            try:
                images, captions, sources = pipe.run()
            except RuntimeError as err:  # a shard changed between its stat and its read
                raise DataError(f"DALI's webdataset reader failed: {err}") from None
            in_window = total - batch * spec.batch_size   # samples of the window from this batch on
            keys, texts, valid = [], [], []
            for i in range(len(images)):
                member = bytes(np.array(sources[i])).decode().rsplit(":", 2)[-1]
                keys.append(split_name(member)[0])
                caption, reason = check_caption(bytes(np.array(captions[i])))
                texts.append(caption or "")
                valid.append(i < in_window and reason is None)
                if i < in_window and reason is not None:  # the shard changed its bytes but not its stamp
                    skips.add(reason, where=keys[-1])
            tokens, lengths = tokenizer(texts)
            yield ReaderBatch(images, keys, tokens, lengths, valid, epoch, window, batch, before, skips.counts)
            skips = SkipCounter()
    finally:
        del pipe


def stream_batches(spec: StreamSpec, tokenizer: Tokenizer, start: Position,
                   stop: threading.Event) -> Iterator[ReaderBatch]:
    """Every reader batch of the rank from `start` on, window after window, epoch after epoch. Data
    that yields nothing stops with DataError: a whole epoch without a sample, or (resampled)
    EMPTY_WINDOWS_LIMIT windows in a row."""
    epoch, window, resume = start.epoch, start.window, start
    produced_in_epoch, empty_windows = start.inside_window, 0
    while not stop.is_set():
        windows = epoch_windows(spec, epoch)
        if windows is not None and window >= len(windows):
            if not produced_in_epoch:
                raise DataError(f"rank {spec.rank}: epoch {epoch} gave no readable sample in its "
                                f"{sum(map(len, windows))} shards; the data looks unreadable")
            epoch, window, produced_in_epoch = epoch + 1, 0, False
            continue
        indices = resampled_window(spec, window) if windows is None else windows[window]
        produced = False
        for item in read_window(spec, tokenizer, epoch, window, indices, resume, stop):
            produced = produced or any(item.valid)
            yield item
        resume = None
        produced_in_epoch = produced_in_epoch or produced
        empty_windows = 0 if produced else empty_windows + 1
        if windows is None and empty_windows >= EMPTY_WINDOWS_LIMIT:
            raise DataError(f"rank {spec.rank}: {empty_windows} resampled windows in a row gave no readable "
                            "sample; the data looks unreadable")
        window += 1


_LIVE_READERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_readers() -> None:
    """A DALI pipeline still alive in a thread when the interpreter exits aborts the process
    ("terminate called without an active exception"): stop every reader first."""
    for reader in list(_LIVE_READERS):
        reader.close()


class ReaderThread:
    """`stream_batches` in a daemon thread, `depth` reader batches ahead. Errors reach the consumer
    where the batch would have been; `close()` stops the thread (and its DALI reader), as does the
    interpreter's exit."""

    _DONE = object()

    def __init__(self, batches: Callable[[threading.Event], Iterator[ReaderBatch]], depth: int = 3):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(batches,), name="megapgs-dali-reader", daemon=True)
        self._thread.start()
        _LIVE_READERS.add(self)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, batches) -> None:
        try:
            for item in batches(self._stop):
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as err:  # noqa: BLE001 -- handed to the consumer, who raises it
            self._put(err)

    def __iter__(self) -> Iterator[ReaderBatch]:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise DataError("the DALI reader thread stopped without a word") from None
                continue
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        _LIVE_READERS.discard(self)
