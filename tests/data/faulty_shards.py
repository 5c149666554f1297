"""A shard set with planted faults, shared by the tests of every loader (CPU and DALI).

    from tests.data.faulty_shards import write_faulty_shards
    faulty = write_faulty_shards(tmp_path)      # -> FaultySet

Six shards are listed in the manifest, 8 samples each as written (48 in all):

    shard  faults                                                      good samples
    0.tar  2 corrupt JPEGs, 1 empty caption ("")                       5
    1.tar  1 corrupt JPEG, 1 truncated JPEG, 1 non-UTF-8 caption        5
    2.tar  1 empty caption (whitespace only); one good sample is PNG   7
    3.tar  none; one good sample is a grayscale JPEG                   8
    4.tar  the tar is cut inside the image of its 6th sample           5
    5.tar  missing: listed in the manifest, no file on disk            0

"Good" means: fully stored before any cut, with a decodable image and a non-empty UTF-8
caption. The truncated tar loses the sample that the cut falls in and every sample after it
(3 samples); they count as one `tar_truncated` skip, not as per-sample skips. Every DALI
index (`{i}.idx`) is written from the intact shard before the cut, as it would be when a
shard is damaged after `make_shards` wrote it (a partial copy).
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from megapgs.data.shards import MANIFEST, write_shards

SHARD_SIZE = 8
WRITTEN_SHARDS = 5                       # 0.tar .. 4.tar; 5.tar is listed but missing
TRUNCATED_SHARD, CUT_SAMPLE = 4, 5       # the cut falls inside the image of sample 5 of 4.tar
MISSING_SHARD = 5

# (shard, index in shard) -> planted fault, as the SkipCounter names it
SAMPLE_FAULTS = {
    (0, 1): "image_undecodable",   # random bytes
    (0, 4): "image_undecodable",   # a JPEG start-of-image marker followed by zeros
    (0, 6): "caption_empty",       # ""
    (1, 0): "image_undecodable",   # plain text with a .jpg name
    (1, 3): "image_truncated",     # a JPEG cut at two thirds of its length
    (1, 7): "caption_not_utf8",    # Latin-1 bytes
    (2, 2): "caption_empty",       # whitespace only
}
PNG_SAMPLE, GRAY_SAMPLE = (2, 5), (3, 4)

EXPECTED_SKIPS = {
    "image_undecodable": 3, "image_truncated": 1, "caption_empty": 2, "caption_not_utf8": 1,
    "tar_truncated": 1, "shard_missing": 1,
}


@dataclass(frozen=True)
class FaultySet:
    manifest: Path                        # megapgs-shards/1 manifest listing all six shards
    shards: list[Path]                    # the six shard paths in manifest order (5.tar does not exist)
    index_paths: list[Path]               # DALI index per shard (5.idx does not exist either)
    good_keys: frozenset[str]             # 30 samples every loader must deliver once per epoch
    expected_skips: dict[str, int]        # SkipCounter counts after one epoch
    fault_keys: dict[str, str] = field(default_factory=dict)   # key -> reason, per-sample faults
    lost_keys: frozenset[str] = frozenset()  # samples lost with the truncated tar
    labels: dict[str, int] = field(default_factory=dict)       # key -> the `.cls` of every written sample


def sample_key(shard: int, index: int) -> str:
    return f"s{shard}_{index:03d}"


def _photo_like(rng: np.random.Generator, height: int, width: int, gray: bool = False) -> np.ndarray:
    """A smooth colour gradient with mild noise: compresses like a photo, decodes stably."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xs / width, ys / height, (xs + ys) / (width + height)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 8, base.shape) + rng.integers(0, 40), 0, 255).astype(np.uint8)
    return pixels[..., 0] if gray else pixels


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _sample(rng: np.random.Generator, shard: int, index: int) -> dict:
    key = sample_key(shard, index)
    height, width = int(rng.integers(36, 60)), int(rng.integers(36, 60))
    fault = SAMPLE_FAULTS.get((shard, index))
    caption: bytes = f"a test photo number {index} of shard {shard}".encode()
    if (shard, index) == PNG_SAMPLE:
        image_ext, image = "png", _encode(_photo_like(rng, height, width), "PNG")
    else:
        gray = (shard, index) == GRAY_SAMPLE
        image_ext, image = "jpg", _encode(_photo_like(rng, height, width, gray), "JPEG")
    if (shard, index) == (0, 1):
        image = rng.integers(0, 256, 600, dtype=np.uint8).tobytes()
    elif (shard, index) == (0, 4):
        image = b"\xff\xd8\xff\xe0" + bytes(400)
    elif (shard, index) == (1, 0):
        image = b"this is not a jpeg\n" * 10
    elif fault == "image_truncated":
        image = image[: len(image) * 2 // 3]
    elif (shard, index) == (0, 6):
        caption = b""
    elif (shard, index) == (2, 2):
        caption = b"  \n\t "
    elif fault == "caption_not_utf8":
        caption = "une photo d'\u00e9t\u00e9 \u00e0 la plage".encode("latin-1")
    return {"__key__": key, image_ext: image, "txt": caption, "cls": str((shard * SHARD_SIZE + index) % 10)}


def _cut_tar(path: Path, member_name: str) -> None:
    """Cut the tar file in the middle of `member_name`'s data (no end-of-archive blocks left)."""
    with tarfile.open(path) as archive:
        member = archive.getmember(member_name)
    cut = member.offset_data + member.size // 2
    data = path.read_bytes()
    path.write_bytes(data[:cut])


def write_faulty_shards(out_dir: Path, seed: int = 0) -> FaultySet:
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    samples = [_sample(rng, shard, index) for shard in range(WRITTEN_SHARDS) for index in range(SHARD_SIZE)]
    manifest = write_shards(iter(samples), out_dir, SHARD_SIZE, total=len(samples), description="faulty shards")
    cut_key = sample_key(TRUNCATED_SHARD, CUT_SAMPLE)
    _cut_tar(out_dir / f"{TRUNCATED_SHARD}.tar", f"{cut_key}.jpg")

    manifest["shards"].append({"path": f"{MISSING_SHARD}.tar", "samples": SHARD_SIZE,
                               "index": f"{MISSING_SHARD}.idx"})
    manifest["samples"] += SHARD_SIZE
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    (out_dir / "nshards.txt").write_text(f"{len(manifest['shards'])}\n")

    fault_keys = {sample_key(*where): reason for where, reason in SAMPLE_FAULTS.items()}
    lost_keys = frozenset(sample_key(TRUNCATED_SHARD, i) for i in range(CUT_SAMPLE, SHARD_SIZE))
    all_keys = {s["__key__"] for s in samples}
    good_keys = frozenset(all_keys - set(fault_keys) - lost_keys)
    assert len(good_keys) == 30, len(good_keys)
    shards = [out_dir / s["path"] for s in manifest["shards"]]
    return FaultySet(
        manifest=out_dir / MANIFEST, shards=shards, index_paths=[p.with_suffix(".idx") for p in shards],
        good_keys=good_keys, expected_skips=dict(EXPECTED_SKIPS), fault_keys=fault_keys,
        lost_keys=lost_keys, labels={s["__key__"]: int(s["cls"]) for s in samples})
