"""Checking shards before DALI reads them: DALI's reader and decoder stop the whole pipeline on
a missing or cut tar and on one bad image, so the GPU loaders read only samples checked here.

One pass over each shard, done once and cached beside it, reads every sample's bytes and keeps
those with a caption that is non-empty UTF-8 and an image whose header parses and whose encoded
stream is complete (JPEG end-of-image marker, PNG `IEND`, WebP RIFF length). It writes:

    {stem}.checked.idx    DALI's index format (`wds2idx` v1.2) listing only the good samples, so
                          `fn.readers.webdataset(index_paths=...)` never sees a bad one
    {stem}.checked.json   the shard's size and mtime (the cache key), sample count and skips

An image that passes these cheap checks and still fails in the decoder is caught at run time
(`deep_check_image`, a full PIL decode, run only on the batch that failed).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from hashlib import sha1
from pathlib import Path
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from megapgs.data.faults import IMAGE_EXTS, SkipCounter, check_caption, decode_image
from megapgs.data.prepare import DataError
from megapgs.atomic import write_json_atomic

CHECK_VERSION = 1
CAPTION_EXT = "txt"


@dataclass(frozen=True)
class CheckedShard:
    path: Path                      # the tar file as listed
    index_path: Path | None         # DALI index of its good samples; None when it has none
    samples: int                    # good samples
    skips: dict[str, int] = field(default_factory=dict)  # reason -> count, shard- and sample-level


@dataclass(frozen=True)
class IndexedSample:
    key: str
    image: tuple[str, int, int]     # (ext, data offset, size) in the tar
    caption: tuple[str, int, int]


# ----------------------------------------------------------------------------- one sample

def check_image(data: bytes) -> str | None:
    """Cheap check of encoded image bytes (header parse, stream end); the skip reason or None."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "image_undecodable"
    body = data.rstrip(b"\x00")  # some writers pad the stream with zeros
    if fmt == "JPEG" and not body.endswith(b"\xff\xd9"):
        return "image_truncated"
    if fmt == "PNG" and b"IEND" not in body[-12:]:
        return "image_truncated"
    if fmt == "WEBP" and int.from_bytes(data[4:8], "little") + 8 > len(data):
        return "image_truncated"
    return None


def deep_check_image(data: bytes) -> str | None:
    """Full decode with PIL, as the CPU loader does (costly: only for a batch the decoder refused)."""
    return decode_image(data)[1]


# ----------------------------------------------------------------------------- one shard

def _split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key ends at the first dot of the file name."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name[:dot], name[dot + 1:]) if dot > 0 else (name, "")


class _Damage(Exception):
    """Where a tar stops being readable (the samples before it are kept)."""


def _scan_members(archive: tarfile.TarFile, fh, tar_size: int, skips: Counter) -> list[list[tuple[str, int, int, str]]]:
    """Regular files grouped by key in tar order: per sample [(ext, offset, size, name)].

    A tar cut short or damaged counts one `tar_truncated` and keeps the samples stored whole
    before the damage, as the CPU loader does (`shards.read_shard`): a cut inside a member's data
    loses that member's sample; a cut on a header (tarfile then ends quietly; the missing
    end-of-archive block tells) loses the sample before it, which may lack members."""
    samples: list[list[tuple[str, int, int, str]]] = []
    last_key = None
    try:
        for member in archive:
            archive.members = []  # tarfile keeps every header otherwise
            if not member.isreg() or member.name.startswith("__"):
                continue
            key, ext = _split_name(member.name)
            if not key or not ext:
                continue
            if member.offset_data + member.size > tar_size:
                if key == last_key:
                    samples.pop()  # the sample the cut falls in
                raise _Damage("member data runs past the end of the file")
            if key != last_key:
                samples.append([])
                last_key = key
            samples[-1].append((ext.lower(), member.offset_data, member.size, member.name))
        fh.seek(archive.offset)
        if fh.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
            if samples:
                samples.pop()
            raise _Damage("no end-of-archive block")
    except _Damage:
        skips["tar_truncated"] += 1
    except (tarfile.ReadError, EOFError):  # a damaged header: whose members follow is unknown
        if samples:
            samples.pop()
        skips["tar_truncated"] += 1
    return samples


def _check_samples(tar_path: Path, samples: list[list[tuple[str, int, int, str]]], skips: Counter) -> list[str]:
    """Index lines ("ext offset size name" for image and caption) of the good samples."""
    lines: list[str] = []
    with open(tar_path, "rb") as fh:
        def read(offset: int, size: int) -> bytes:
            fh.seek(offset)
            return fh.read(size)

        for members in samples:
            by_ext = {m[0]: m for m in members}
            image = next((by_ext[ext] for ext in IMAGE_EXTS if ext in by_ext), None)
            caption = by_ext.get(CAPTION_EXT)
            if image is None:
                skips["image_missing"] += 1
                continue
            if caption is None:
                skips["caption_missing"] += 1
                continue
            reason = check_caption(read(*caption[1:3]))[1] or check_image(read(*image[1:3]))
            if reason:
                skips[reason] += 1
                continue
            lines.append(" ".join(" ".join(map(str, m)) for m in (image, caption)))
    return lines


def cache_paths(tar_path: Path, cache_root: Path) -> tuple[Path, Path]:
    """Where the checked index and its record live: beside the shard, else under cache_root."""
    stem = tar_path.name.removesuffix(".tar")
    home = tar_path.parent
    if not _writable(home):
        home = cache_root / sha1(str(tar_path.resolve()).encode()).hexdigest()[:16]
        home.mkdir(parents=True, exist_ok=True)
    return home / f"{stem}.checked.idx", home / f"{stem}.checked.json"


def _writable(folder: Path) -> bool:
    probe = folder / ".megapgs-write-probe"
    try:
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


def check_shard(tar_path: str | Path, cache_root: Path) -> CheckedShard:
    """Check one shard (or reuse the cached result) and return where its good samples are listed."""
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        return CheckedShard(tar_path, None, 0, {"shard_missing": 1})
    stat = tar_path.stat()
    if stat.st_size == 0:
        return CheckedShard(tar_path, None, 0, {"shard_empty": 1})
    index_path, record_path = cache_paths(tar_path, cache_root)
    stamp = {"version": CHECK_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if record_path.is_file() and index_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except json.JSONDecodeError:
            record = {}
        if record.get("stamp") == stamp:
            return CheckedShard(tar_path, index_path if record["samples"] else None, record["samples"],
                                record["skips"])
    skips: Counter = Counter()
    try:
        with open(tar_path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as archive:
            samples = _scan_members(archive, fh, stat.st_size, skips)
    except (tarfile.ReadError, EOFError):  # not even one header readable
        samples = []
        skips["tar_truncated"] += 1
    if not samples and not skips:
        skips["shard_empty"] += 1  # a tar without a sample
    lines = _check_samples(tar_path, samples, skips)
    if lines:  # written whole then renamed: ranks that check the same shard at once do not clash
        partial = index_path.with_name(f"{index_path.name}.tmp{os.getpid()}")
        partial.write_text(f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines))
        os.replace(partial, index_path)
    write_json_atomic(record_path, {"stamp": stamp, "samples": len(lines), "skips": dict(skips)})
    return CheckedShard(tar_path, index_path if lines else None, len(lines), dict(skips))


def read_checked_index(index_path: Path) -> list[IndexedSample]:
    """The samples a checked index lists, in order."""
    samples = []
    for line in index_path.read_text().splitlines()[1:]:
        fields = line.split()
        image, caption = fields[0:4], fields[4:8]
        samples.append(IndexedSample(_split_name(image[3])[0], (image[0], int(image[1]), int(image[2])),
                                     (caption[0], int(caption[1]), int(caption[2]))))
    return samples


def check_shards(paths: Sequence[str], cache_root: Path, threads: int = 4) -> list[CheckedShard]:
    """Check every shard (cached ones are only stat'ed), in order. Reading is I/O-bound, so a few
    threads overlap it; `prepare_data` may call this on each node's first rank before the barrier
    so that the other ranks find every result cached."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(lambda path: check_shard(path, cache_root), paths))


def check_readable_shards(shards: Sequence[str], cache_root: Path, threads: int = 4) -> list[CheckedShard]:
    """`check_shards` for a loader: local files only, and at least one readable sample in all
    of them, else DataError naming the skips (a run on unreadable data stops at once)."""
    remote = [url for url in shards if "://" in url or url.startswith("pipe:")]
    if remote:
        raise DataError(f"the dali and nvjpeg loaders read local shard files only (got {remote[0]}); "
                        "use data.loader 'wds' for remote shards")
    checked = check_shards(list(shards), cache_root, threads)
    if not any(shard.samples for shard in checked):
        skips = SkipCounter()
        for shard in checked:
            skips.merge(shard.skips)
        first = shards[0] if shards else None
        raise DataError(f"no readable sample in the {len(checked)} shards (first: {first}): {skips.summary()}. "
                        "Check data.train_shards and the files it names.")
    return checked
