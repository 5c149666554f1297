"""Held-out data for evaluation, in batches of unaugmented images: webdataset shards in
clip_benchmark's layout (what training evaluates on), or an image folder with one sub-folder per
class (torchvision's ImageFolder layout, for tools/evaluate.py).

    shards:  ROOT/classnames.txt, ROOT/zeroshot_classification_templates.txt, ROOT/test/*.tar
             (each sample an image, `.cls` its class index, `.txt` its caption)
    folder:  ROOT/<class folder>/<image>.jpg|jpeg|png|webp   (labels: the sorted folder names' order)

Every readable sample comes once, in a fixed order; unreadable images and captions are skipped and
counted as in training.

Shared by ranks, a set of shards is cut into *units*: runs of at most one batch of samples inside
one shard, numbered in the set's order. Each rank takes a contiguous block of units (its parts of
the tars, whose other samples it never reads) and decodes them in its own workers; a unit is one
batch, the same batch on any number of ranks, so the embeddings do not depend on the world size.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby, islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megapgs.data.faults import IMAGE_EXTS, SkipCounter, check_caption, decode_image, image_member
from megapgs.data.shards import read_shard, sample_counts
from megapgs.data.transforms import eval_pixels, normalize

EvalSample = tuple[torch.Tensor, int, str, str]                   # uint8 pixels, label, caption, key
EvalBatch = tuple[torch.Tensor, torch.Tensor, list[str], list[str]]          # images, labels, captions, keys


def batch_eval_samples(samples: Iterable[EvalSample], batch_size: int) -> Iterator[EvalBatch]:
    """(images (B, 3, H, W) float32, labels (B,) int64, captions, keys); the last batch may be smaller."""
    rows: list[EvalSample] = []

    def stacked() -> EvalBatch:
        images, labels, captions, keys = zip(*rows)
        return normalize(images), torch.tensor(labels, dtype=torch.int64), list(captions), list(keys)

    for sample in samples:
        rows.append(sample)
        if len(rows) == batch_size:
            yield stacked()
            rows = []
    if rows:
        yield stacked()


def _shard_samples(shards: Sequence[str], image_size: int, skips: SkipCounter) -> Iterator[EvalSample | None]:
    for shard in shards:
        yield from _decoded(shard, read_shard(str(shard), skips), image_size, skips)


def _decoded(shard: str, samples: Iterable[dict], image_size: int, skips: SkipCounter) -> Iterator[EvalSample | None]:
    """Each sample decoded, or None (counted in `skips`) when its image or caption is unreadable."""
    for sample in samples:
        where = f"{sample['__key__']} in {shard}"
        caption, reason = check_caption(sample["txt"]) if "txt" in sample else ("", None)
        image = None
        if reason is None:
            image, reason = decode_image(image_member(sample))
        if reason is not None:
            skips.add(reason, where)
            yield None
            continue
        try:
            label = int(sample["cls"].decode().strip()) if "cls" in sample else -1
        except (UnicodeDecodeError, ValueError):
            label = -1
        yield eval_pixels(image, image_size), label, caption, sample["__key__"]


def iter_eval_batches(shards: Sequence[str], *, image_size: int, batch_size: int,
                      skips: SkipCounter | None = None) -> Iterator[EvalBatch]:
    """Held-out batches of webdataset shards in shard and tar order. Labels come from `.cls` (-1 where
    absent); a sample without a `.txt` keeps an empty caption (a pure classification set)."""
    skips = skips if skips is not None else SkipCounter()
    good = (sample for sample in _shard_samples(shards, image_size, skips) if sample is not None)
    return batch_eval_samples(good, batch_size)


# ----------------------------------------------------------------------------- a set shared by ranks

@dataclass(frozen=True)
class EvalUnit:
    """Samples [start, stop) of one shard (numbered in tar order): one batch."""
    index: int          # the unit's place in the whole set's order
    shard: str
    start: int
    stop: int


def eval_units(shards: Sequence[str], batch_size: int, max_samples: int | None = None) -> list[EvalUnit]:
    """The set cut into units of at most `batch_size` samples, never across a shard, from the sample
    counts of its manifest (or its tar headers). With `max_samples`, the first that many samples of
    the set in shard order (unreadable ones among them are skipped and counted, not replaced). A
    shard with no samples is a unit of none, so that the one rank reading it counts why."""
    units: list[EvalUnit] = []
    left = max_samples
    for shard, count in zip(shards, sample_counts(shards)):
        if left is not None:
            if left <= 0:
                break
            count = min(count, left)
            left -= count
        starts = range(0, count, batch_size) if count else [0]
        units += [EvalUnit(len(units) + i, str(shard), start, min(start + batch_size, count))
                  for i, start in enumerate(starts)]
    return units


def rank_units(units: Sequence[EvalUnit], rank: int, world_size: int) -> list[EvalUnit]:
    """This rank's contiguous block of the units (the blocks differ in length by at most one)."""
    return list(units[rank * len(units) // world_size:(rank + 1) * len(units) // world_size])


class _UnitBatches(IterableDataset):
    """(unit index, its batch or None when none of its samples was readable, skips) per unit; the
    units are dealt to the workers in turn, so a DataLoader returns them in order. A worker reads
    each shard once, taking the samples of its units in it."""

    def __init__(self, units: Sequence[EvalUnit], image_size: int):
        self.units, self.image_size = list(units), image_size

    def __iter__(self):
        info = get_worker_info()
        mine = self.units[info.id::info.num_workers] if info is not None else self.units
        for shard, group in groupby(mine, key=lambda unit: unit.shard):
            group = list(group)
            numbers = [n for unit in group for n in range(unit.start, unit.stop)]
            skips = SkipCounter()
            samples = _decoded(shard, read_shard(shard, skips, set(numbers) | {u.start for u in group}),
                               self.image_size, skips)
            for unit in group:
                rows = [row for row in islice(samples, unit.stop - unit.start) if row is not None]
                yield unit.index, next(batch_eval_samples(rows, len(rows))) if rows else None, skips.take()


def _as_is(item):
    return item


def iter_unit_batches(units: Sequence[EvalUnit], *, image_size: int, workers: int = 0,
                      skips: SkipCounter | None = None) -> Iterator[EvalBatch | None]:
    """The batch of each unit in order (None for a unit with no readable sample), decoded by
    `workers` processes (0: in this one); skipped samples are counted in `skips`."""
    dataset = _UnitBatches(units, image_size)
    if workers > 0 and len(units) > 1:
        items: Iterable = DataLoader(dataset, batch_size=None, num_workers=min(workers, len(units)),
                                     collate_fn=_as_is)
    else:
        items = iter(dataset)
    for _, batch, skipped in items:
        if skips is not None:
            skips.merge(skipped)
        yield batch


def folder_classes(root: Path) -> list[str]:
    """The class folders of an image-folder data set, sorted: their order gives the labels."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{root} has no class sub-folders (expected ROOT/<class>/<image>.jpg)")
    return classes


def _folder_samples(root: Path, image_size: int, skips: SkipCounter) -> Iterator[EvalSample]:
    for label, name in enumerate(folder_classes(root)):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower().lstrip(".") not in IMAGE_EXTS or not path.is_file():
                continue
            image, reason = decode_image(path.read_bytes())
            if reason is not None:
                skips.add(reason, str(path))
                continue
            yield eval_pixels(image, image_size), label, "", f"{name}/{path.name}"


def iter_folder_batches(root: Path, *, image_size: int, batch_size: int,
                        skips: SkipCounter | None = None) -> Iterator[EvalBatch]:
    """Held-out batches of an image folder: class folders in sorted order, files sorted in each;
    captions are empty (classification only)."""
    skips = skips if skips is not None else SkipCounter()
    return batch_eval_samples(_folder_samples(Path(root), image_size, skips), batch_size)
