"""Bad input that never stops a run: skipped samples and shards, counted by reason.

Every loader (webdataset+PIL, DALI) applies the same rules:
- a sample with an undecodable or truncated image, or an empty or non-UTF-8 caption, is skipped;
- a missing, zero-byte or truncated shard is skipped from the point where it fails (a truncated
  tar still delivers the samples stored completely before the cut);
- each skip adds one to a `SkipCounter` reason; the counts are a plain dict of ints, merged over
  workers and all-reduced over ranks, and logged;
- a run whose data is entirely unreadable raises `DataError` after a bounded number of fruitless
  shard reads (`FruitlessReads`), never loops or waits forever; a loader waiting on its workers
  gives up after `data.timeout_s`.
"""
from __future__ import annotations

import io
import logging
from typing import Iterable, Mapping, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from megapgs.dist import DistInfo, all_reduce_sum

log = logging.getLogger(__name__)

class DataError(RuntimeError):
    """The configured data cannot be found or read; the message says which key and what to do.
    (Also importable from megapgs.data.prepare.)"""


# The reasons, in the fixed order of the all-reduced tensor.
REASONS = (
    "image_undecodable",   # not an image PIL can open or decode
    "image_truncated",     # an image cut short
    "image_missing",       # a sample without a jpg/png/webp member
    "caption_empty",       # no caption text, or whitespace only
    "caption_not_utf8",    # caption bytes that are not UTF-8
    "caption_missing",     # a sample without a txt member
    "tar_truncated",       # a shard cut short or corrupt from some point on (the rest of it is lost)
    "shard_missing",       # a listed shard file that does not exist or cannot be opened
    "shard_empty",         # a zero-byte shard, or a tar without a sample
    "shard_changed",       # a shard whose size or mtime is not what its index recorded (index it again)
)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LOGGED_PER_REASON = 5  # each process logs the first few skips of each reason, then only counts


def skips_of_old_ranks(counts: Sequence[Mapping[str, int]], rank: int, world_size: int) -> SkipCounter:
    """A run resumed on `world_size` ranks from one on len(counts): the skip counts of old ranks
    r with r mod world_size == rank, so the sum over the new ranks is the old total."""
    return SkipCounter.summed(counts[rank::world_size])


class SkipCounter:
    """Skips by reason. `counts` is a plain {reason: int} dict (every reason present)."""

    def __init__(self, counts: Mapping[str, int] | None = None):
        self.counts: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._logged: dict[str, int] = dict.fromkeys(REASONS, 0)
        if counts:
            self.merge(counts)

    def add(self, reason: str, where: str = "", detail: str = "") -> None:
        """Count one skip; log it while this reason has been logged fewer than a few times."""
        if reason not in self.counts:
            raise KeyError(f"unknown skip reason {reason!r}; known: {', '.join(REASONS)}")
        self.counts[reason] += 1
        if self._logged[reason] < LOGGED_PER_REASON:
            self._logged[reason] += 1
            more = " (further skips of this kind are counted, not logged)" if (
                self._logged[reason] == LOGGED_PER_REASON) else ""
            log.warning("skipped %s: %s%s%s", where or "input", reason, f" ({detail})" if detail else "", more)

    @staticmethod
    def summed(counts: Iterable[Mapping[str, int]]) -> SkipCounter:
        total = SkipCounter()
        for one in counts:
            total.merge(one)
        return total

    def merge(self, counts: Mapping[str, int] | SkipCounter) -> None:
        """Add another counter's counts (a worker's, a rank's, a checkpoint's) to this one."""
        counts = counts.counts if isinstance(counts, SkipCounter) else counts
        for reason, count in counts.items():
            if reason not in self.counts:
                raise KeyError(f"unknown skip reason {reason!r}; known: {', '.join(REASONS)}")
            self.counts[reason] += int(count)

    def take(self) -> dict[str, int]:
        """The counts so far, resetting them to zero (a worker ships its counts with each batch)."""
        counts, self.counts = self.counts, dict.fromkeys(REASONS, 0)
        return counts

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def nonzero(self) -> dict[str, int]:
        return {reason: count for reason, count in self.counts.items() if count}

    def summary(self) -> str:
        parts = [f"{count:,} {reason}" for reason, count in self.nonzero().items()]
        return f"skipped {self.total:,}: " + ", ".join(parts) if parts else "skipped 0"

    def log_summary(self, logger: logging.Logger = log, prefix: str = "data") -> None:
        (logger.warning if self.total else logger.info)("%s: %s", prefix, self.summary())

    def all_reduced(self, dist: DistInfo | None = None) -> SkipCounter:
        """The counts summed over all ranks, as a new counter. With several ranks every rank must
        call it (it is a collective, on the ranks' communication device); alone, it is a copy."""
        if dist is None or dist.world_size == 1:
            return SkipCounter(self.counts)
        counts_R = torch.tensor([self.counts[r] for r in REASONS], dtype=torch.int64)
        return SkipCounter(dict(zip(REASONS, all_reduce_sum(counts_R, dist).tolist())))

    def __repr__(self) -> str:
        return f"SkipCounter({self.nonzero()})"


# ----------------------------------------------------------------------------- sample checks

def check_caption(data: bytes | None) -> tuple[str | None, str | None]:
    """(caption, None) for a usable caption, else (None, reason)."""
    if data is None:
        return None, "caption_missing"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "caption_not_utf8"
    text = text.strip()
    if not text:
        return None, "caption_empty"
    return text, None


def image_member(sample: Mapping[str, object]) -> bytes | None:
    """The encoded image of a webdataset sample (the first of jpg, jpeg, png, webp), or None."""
    for ext in IMAGE_EXTS:
        data = sample.get(ext)
        if data is not None:
            return data  # type: ignore[return-value]
    return None


def decode_image(data: bytes | None) -> tuple[Image.Image | None, str | None]:
    """(RGB PIL image, None), or (None, reason) for an image that is missing, undecodable or
    truncated. Grayscale, palette and alpha images are converted to RGB."""
    if data is None:
        return None, "image_missing"
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB"), None
    except UnidentifiedImageError:
        return None, "image_undecodable"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL says "image file is truncated" or "Truncated File Read" for an image cut short
        return None, "image_truncated" if "truncated" in str(err).lower() else "image_undecodable"


# ----------------------------------------------------------------------------- all-unreadable rule

class FruitlessReads:
    """Stops a loader whose data yields nothing. A worker tells it of each shard it has read, of
    each good sample it has produced, and of the end of each of its epochs. At an epoch's end
    (where the shuffle buffer has drained, so no good sample is still on its way) it raises
    `DataError` when the shard reads since the last good sample cover every shard of the set, or
    number `limit` or more: a bounded number of attempts, however large the set."""

    def __init__(self, all_shards: Iterable[str], limit: int = 256):
        self.all_shards = frozenset(all_shards)
        self.limit = limit
        self.fruitless: set[str] = set()     # shards read since the last good sample
        self.reads = 0                       # how many reads that was
        self.good_since_read = False

    def good_sample(self) -> None:
        self.good_since_read = True

    def shard_read(self, shard: str) -> None:
        if self.good_since_read:
            self._reset()
        self.fruitless.add(shard)
        self.reads += 1

    def epoch_done(self, skips: SkipCounter) -> None:
        if self.good_since_read:
            self._reset()
        elif self.reads and (self.fruitless >= self.all_shards or self.reads >= self.limit):
            raise DataError(
                f"no readable sample in {self.reads} shard reads ({len(self.fruitless)} of the "
                f"{len(self.all_shards)} shards, e.g. {next(iter(self.fruitless))}): the data looks "
                f"entirely unreadable ({skips.summary()}). Check data.train_shards and the files it names.")

    def _reset(self) -> None:
        self.fruitless.clear()
        self.reads = 0
        self.good_since_read = False
