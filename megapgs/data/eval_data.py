"""Held-out data for evaluation, in batches of unaugmented images: webdataset shards in
clip_benchmark's layout (what training evaluates on), or an image folder with one sub-folder per
class (torchvision's ImageFolder layout, for tools/evaluate.py).

    shards:  ROOT/classnames.txt, ROOT/zeroshot_classification_templates.txt, ROOT/test/*.tar
             (each sample an image, `.cls` its class index, `.txt` its caption)
    folder:  ROOT/<class folder>/<image>.jpg|jpeg|png|webp   (labels: the sorted folder names' order)

Every readable sample comes once, in a fixed order; unreadable images and captions are skipped and
counted as in training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from megapgs.data.faults import IMAGE_EXTS, SkipCounter, check_caption, decode_image, image_member
from megapgs.data.shards import read_shard
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


def _shard_samples(shards: Sequence[str], image_size: int, skips: SkipCounter) -> Iterator[EvalSample]:
    for shard in shards:
        for sample in read_shard(str(shard), skips):
            where = f"{sample['__key__']} in {shard}"
            caption, reason = check_caption(sample["txt"]) if "txt" in sample else ("", None)
            image = None
            if reason is None:
                image, reason = decode_image(image_member(sample))
            if reason is not None:
                skips.add(reason, where)
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
    return batch_eval_samples(_shard_samples(shards, image_size, skips), batch_size)


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
