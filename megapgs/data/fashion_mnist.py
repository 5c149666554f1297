"""Fashion-MNIST as image-text shards: the embedded default's data.

Fashion-MNIST holds 70 000 grey 28x28 photos of 10 kinds of clothing (60 000 train, 10 000 test).
Debian ships the original idx files in `dataset-fashion-mnist`. We turn each split into webdataset
shards, one PNG and one caption per image, plus the class index in the test split (a template such as "a photo of a {class}." drawn at
random with a fixed seed), and lay the test split out as clip_benchmark's webdataset datasets
(`classnames.txt`, `zeroshot_classification_templates.txt`) for zero-shot evaluation.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import random
import shutil
import socket
import struct
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from megapgs.atomic import write_json_atomic
from megapgs.data.shards import MANIFEST, write_shards

log = logging.getLogger(__name__)

CLASSNAMES = ["t-shirt", "trouser", "pullover", "dress", "coat",
              "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATES = [
    "a photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low resolution photo of a {c}.",
    "a grayscale photo of the {c}.",
    "a product photo of a {c}.",
    "a picture of a {c}.",
    "a close-up photo of the {c}.",
    "an image of a {c}.",
]
RAW_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CAPTION_SEED = 0  # captions are part of the data set, not of a run: fixed
LAYOUT_VERSION = 2  # 2: DALI index files beside the shards
STAMP = "prepared.json"


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) idx file: uint8 images (N, rows, cols) or labels (N,)."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic == 2049:
        shape, offset = (count,), 8
    elif magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        shape, offset = (count, rows, cols), 16
    else:
        raise ValueError(f"{path} is not an idx image or label file (magic {magic})")
    array = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {array.size} values for shape {shape}")
    return array.reshape(shape)


def locate_raw(configured_dir: Path, cache_dir: Path) -> Path:
    """The folder holding the four idx files: Debian's, else a torchvision download into the cache."""
    needed = [name for pair in RAW_FILES.values() for name in pair]
    for folder in (configured_dir, cache_dir / "FashionMNIST" / "raw"):
        if all((folder / name).is_file() for name in needed):
            return folder
    log.info("Fashion-MNIST not found in %s; trying torchvision's downloader", configured_dir)
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(cache_dir), train=True, download=True)
        FashionMNIST(str(cache_dir), train=False, download=True)
    except Exception as err:  # any network or disk failure: say how to get the files
        raise FileNotFoundError(
            f"Fashion-MNIST idx files are not in {configured_dir} and could not be downloaded ({err}).\n"
            "  Install them with:  apt-get install dataset-fashion-mnist\n"
            "  or point data.fashion_mnist_dir at a folder holding " + ", ".join(needed)) from None
    return cache_dir / "FashionMNIST" / "raw"


def iter_samples(images: np.ndarray, labels: np.ndarray, seed: int, with_label: bool) -> Iterator[dict]:
    """PNG + caption per image, and the class index (`cls`, as clip_benchmark reads it) if asked."""
    rng = random.Random(seed)
    for index, (pixels, label) in enumerate(zip(images, labels)):
        png = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(png, format="PNG")
        sample = {"__key__": f"{index:06d}", "png": png.getvalue(),
                  "txt": rng.choice(TEMPLATES).format(c=CLASSNAMES[label])}
        if with_label:
            sample["cls"] = str(int(label))
        yield sample


def _fingerprint(raw_dir: Path, shard_size: int, max_samples: int | None) -> dict:
    digest = hashlib.sha256()
    for pair in RAW_FILES.values():
        for name in pair:
            digest.update(name.encode() + (raw_dir / name).read_bytes())
    digest.update(json.dumps([CLASSNAMES, TEMPLATES, CAPTION_SEED]).encode())
    return {"layout": LAYOUT_VERSION, "raw_sha256": digest.hexdigest(), "shard_size": shard_size,
            "max_samples": max_samples}


def _stamp_matches(out_dir: Path, fingerprint: dict) -> bool:
    stamp = out_dir / STAMP
    try:
        return json.loads(stamp.read_text()).get("fingerprint") == fingerprint
    except (OSError, json.JSONDecodeError):
        return False


def _move_into_place(staging: Path, out_dir: Path, fingerprint: dict) -> None:
    """Replace `out_dir` by `staging`; if another process (another node) got there first with the
    same data, keep theirs."""
    if _stamp_matches(out_dir, fingerprint):
        shutil.rmtree(staging)
        return
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        staging.rename(out_dir)
    except OSError:
        if not _stamp_matches(out_dir, fingerprint):
            raise
        shutil.rmtree(staging)


def prepare_fashion_mnist(raw_dir: Path, out_dir: Path, shard_size: int,
                          max_samples: int | None = None) -> dict[str, dict]:
    """Write the train and test shards under `out_dir` (reused when already prepared from the same
    files and settings); return {split: manifest}. `max_samples` caps each split (for tests).

    The shards are written into a sibling folder and moved into place at the end, so an
    interrupted preparation never leaves a half-written data set that looks complete.
    """
    fingerprint = _fingerprint(raw_dir, shard_size, max_samples)
    if _stamp_matches(out_dir, fingerprint):
        log.info("Fashion-MNIST shards ready in %s (cached)", out_dir)
        return {split: json.loads((out_dir / split / MANIFEST).read_text()) for split in RAW_FILES}

    started = time.perf_counter()
    staging = out_dir.with_name(f"{out_dir.name}.partial-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        manifests = {}
        for split, (image_file, label_file) in RAW_FILES.items():
            images, labels = read_idx(raw_dir / image_file), read_idx(raw_dir / label_file)
            if len(images) != len(labels):
                raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels in {raw_dir}")
            images, labels = images[:max_samples], labels[:max_samples]
            samples = iter_samples(images, labels, CAPTION_SEED + (split == "test"), with_label=split == "test")
            manifests[split] = write_shards(samples, staging / split, shard_size, total=len(images), checked=True,
                                            description=f"Fashion-MNIST {split}")
        (staging / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
        (staging / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
        write_json_atomic(staging / STAMP, {"fingerprint": fingerprint,
                                            "samples": {s: m["samples"] for s, m in manifests.items()}})
    except BaseException:  # interrupted or failed: leave no half-written staging folder behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_into_place(staging, out_dir, fingerprint)
    log.info("Fashion-MNIST shards written to %s in %.1f s", out_dir, time.perf_counter() - started)
    return manifests
