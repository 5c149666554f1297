"""Shards checked once, where they are indexed, not by every rank before step 1.

Indexing a shard reads it once: every member header, every caption, and every image's header and
end (the same rules as the CPU loader, `faults.py`). It writes, into an index folder of its own (the
data set may be read-only):

    shards/ab/abcdef0123456789.idx    DALI's index format (`wds2idx` v1.2) of the shard's *good*
                                      samples only: DALI's reader never meets a bad one
    shards/ab/abcdef0123456789.json   the record: the shard's path, size and mtime as indexed, its
                                      good sample count and the skips by reason

(named by a hash of the shard's absolute path), and at the end `manifest.json`, which lists every
shard in the given order with its record. A record whose shard still has the size and mtime it
had is reused, so indexing resumes after a kill where it stopped, and re-indexing a grown data set
reads only the new shards. The loaders trust a manifest: they compare each shard's size and mtime
with its record when they open it (a stat, no read) and skip and count a shard that changed.

Who indexes: `tools/index_shards.py` (any number of processes, a progress bar) for shards made
elsewhere; `tools/make_shards.py` indexes what it writes; a run given a brace pattern of shards
without a manifest indexes them on the first rank of each node while the other ranks wait for the
manifest file (`ensure_manifest`).
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha1
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from megapgs.atomic import temporary_sibling, write_json_atomic
from megapgs.data.faults import IMAGE_EXTS, DataError, SkipCounter, check_caption, decode_image
from megapgs.data.shards import MANIFEST, MANIFEST_FORMAT, progress_bar, read_manifest

log = logging.getLogger(__name__)

CHECK_VERSION = 2
CAPTION_EXT = "txt"


@dataclass(frozen=True)
class IndexedShard:
    """One shard as a manifest lists it."""
    path: str                          # the tar file, absolute (or a URL, which only the wds loader reads)
    samples: int                       # good samples
    index: Path | None = None          # DALI index of the good samples; None when there is none
    skips: dict[str, int] = field(default_factory=dict)  # reason -> count found when indexing
    size: int | None = None            # the file as indexed (None: a /1 manifest did not record it)
    mtime_ns: int | None = None

    def changed(self) -> str | None:
        """Why the file is not the one indexed (a stat, no read): None, "shard_missing" or
        "shard_changed". A shard that was missing when indexed and is still missing is not reported
        again (its index-time skips say so)."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return None if self.skips.get("shard_missing") else "shard_missing"
        if self.skips.get("shard_missing"):
            return "shard_changed"  # it is there now, but was not indexed
        if self.size is not None and (stat.st_size, stat.st_mtime_ns) != (self.size, self.mtime_ns):
            return "shard_changed"
        return None


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
    """Full decode with PIL, as the CPU loader does (costly: only for a batch a decoder refused)."""
    return decode_image(data)[1]


# ----------------------------------------------------------------------------- one shard

def split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key ends at the first dot of the file name (a folder prefix stays in
    the key, as img2dataset's `00000/000000123.jpg` has it)."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name[:dot], name[dot + 1:]) if dot > 0 else (name, "")


class _Damage(Exception):
    """Where a tar stops being readable (the samples before it are kept)."""


Member = tuple[str, int, int, str]       # (ext, data offset, size, member name)


def _scan_members(archive: tarfile.TarFile, fh, tar_size: int, skips: Counter) -> list[list[Member]]:
    """Regular files grouped by key in tar order. A tar cut short or damaged counts one
    `tar_truncated` and keeps the samples stored whole before the damage, as the CPU loader does
    (`shards.read_shard`): a cut inside a member's data loses that member's sample; a cut on a
    header (tarfile then ends quietly; the missing end-of-archive block tells) loses the sample
    before it, which may lack members."""
    samples: list[list[Member]] = []
    last_key = None
    try:
        for member in archive:
            archive.members = []  # tarfile keeps every header otherwise
            if not member.isreg() or member.name.startswith("__"):
                continue
            key, ext = split_name(member.name)
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


def _good_sample_lines(fh, samples: list[list[Member]], skips: Counter) -> list[str]:
    """Index lines ("ext offset size name" of the image and the caption) of the good samples."""
    def read(offset: int, size: int) -> bytes:
        fh.seek(offset)
        return fh.read(size)

    lines: list[str] = []
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


def record_paths(shard: str, out_dir: Path) -> tuple[Path, Path]:
    """(checked index, record) of a shard in an index folder, named by its absolute path."""
    digest = sha1(str(Path(shard).resolve()).encode()).hexdigest()[:16]
    folder = out_dir / "shards" / digest[:2]
    return folder / f"{digest}.idx", folder / f"{digest}.json"


def _write_quickly(path: Path, text: str) -> None:
    """Whole or not at all under its name (a rename), without an fsync per shard: a record lost to
    a crash of the machine is only a shard indexed again."""
    tmp = temporary_sibling(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _stamp(shard: str) -> dict | None:
    try:
        stat = os.stat(shard)
    except OSError:
        return None
    return {"version": CHECK_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def reusable_record(shard: str, out_dir: Path) -> dict | None:
    """The shard's record when it was made by this version from the file as it is now."""
    stamp = _stamp(shard)
    _, record_path = record_paths(shard, out_dir)
    if stamp is None or not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("stamp") == stamp and record.get("path") == shard else None


def index_shard(shard: str, out_dir: Path) -> dict:
    """Check one local shard and write its checked index and record; return the record."""
    index_path, record_path = record_paths(shard, out_dir)
    stamp = _stamp(shard)
    skips: Counter = Counter()
    lines: list[str] = []
    if stamp is None:
        skips["shard_missing"] += 1
    elif stamp["size"] == 0:
        skips["shard_empty"] += 1
    else:
        try:
            with open(shard, "rb") as fh:
                with tarfile.open(fileobj=fh, mode="r:") as archive:
                    samples = _scan_members(archive, fh, stamp["size"], skips)
                lines = _good_sample_lines(fh, samples, skips)
        except (tarfile.ReadError, EOFError):  # not even one header readable
            skips["tar_truncated"] += 1
        if not lines and not skips:
            skips["shard_empty"] += 1  # a tar without a sample
    record_path.parent.mkdir(parents=True, exist_ok=True)
    if lines:
        _write_quickly(index_path, f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines))
    record = {"path": shard, "stamp": stamp, "samples": len(lines), "skips": dict(skips),
              "index": index_path.relative_to(out_dir).as_posix() if lines else None}
    if stamp is not None:  # a missing shard is looked at again next time
        _write_quickly(record_path, json.dumps(record) + "\n")
    return record


def _index_chunk(shards: list[str], out_dir: str) -> list[dict]:  # a worker process's task (picklable)
    return [index_shard(shard, Path(out_dir)) for shard in shards]


# ----------------------------------------------------------------------------- many shards

def index_shards(shards: Sequence[str], out_dir: Path, processes: int = 1, progress: bool = True,
                 chunk: int = 16) -> dict:
    """Index every local shard (reusing valid records) with `processes` worker processes, write
    `out_dir/manifest.json` and return the manifest. Safe to kill and run again."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = [str(Path(s).resolve()) for s in shards]
    remote = [s for s in shards if "://" in s or s.startswith("pipe:")]
    if remote:
        raise DataError(f"shards are indexed where they lie, as local files (got {remote[0]})")
    records: dict[str, dict] = {}
    for shard in shards:
        record = reusable_record(shard, out_dir)
        if record is not None:
            records[shard] = record
    todo = [s for s in dict.fromkeys(shards) if s not in records]
    started = time.perf_counter()
    with _progress(progress, len(set(shards)), len(records)) as advance:
        chunks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
        if processes > 1 and len(chunks) > 1:
            with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
                for done in pool.map(_index_chunk, chunks, [str(out_dir)] * len(chunks)):
                    records.update((r["path"], r) for r in done)
                    advance(len(done))
        else:
            for part in chunks:
                records.update((r["path"], r) for r in _index_chunk(part, str(out_dir)))
                advance(len(part))
    manifest = manifest_of([records[s] for s in shards], out_dir)
    write_json_atomic(out_dir / MANIFEST, manifest)
    log.info("indexed %d shards (%d read now, %d unchanged) in %.1f s: %s good samples; %s",
             len(shards), len(todo), len(shards) - len(todo), time.perf_counter() - started,
             f"{manifest['samples']:,}", SkipCounter(manifest["skips"]).summary())
    return manifest


def manifest_of(records: list[dict], out_dir: Path) -> dict:
    """The manifest listing these records, in order (index paths relative to `out_dir`)."""
    skips = SkipCounter()
    entries = []
    for record in records:
        skips.merge(record["skips"])
        stamp = record["stamp"] or {}
        entries.append({"path": record["path"], "samples": record["samples"], "index": record["index"],
                        "size": stamp.get("size"), "mtime_ns": stamp.get("mtime_ns"), "skips": record["skips"]})
    return {"format": MANIFEST_FORMAT, "samples": sum(e["samples"] for e in entries), "skips": skips.nonzero(),
            "shards": entries}


class _progress:
    """A rich progress bar over shards (or nothing), as a context giving `advance(n)`."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        self.bar = progress_bar()
        self.bar.__enter__()
        task = self.bar.add_task("indexing shards", total=self.total, completed=self.done, rate="")
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)


# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class IndexedSample:
    key: str
    image: tuple[str, int, int]     # (ext, data offset, size) in the tar
    caption: tuple[str, int, int]


def read_index(index_path: Path) -> list[IndexedSample]:
    """The samples a checked index lists, in tar order."""
    samples = []
    for line in Path(index_path).read_text().splitlines()[1:]:
        fields = line.split()
        image, caption = fields[0:4], fields[4:8]
        samples.append(IndexedSample(split_name(image[3])[0], (image[0], int(image[1]), int(image[2])),
                                     (caption[0], int(caption[1]), int(caption[2]))))
    return samples


def read_index_manifest(path: Path) -> tuple[list[IndexedShard], bool]:
    """The shards a manifest lists (absolute paths), and whether its indexes can be trusted as they
    are (format /2: checked, with the size and mtime to verify each shard by)."""
    try:
        manifest = read_manifest(Path(path))
    except ValueError as err:
        raise DataError(str(err)) from None
    shards = [IndexedShard(entry["path"], int(entry["samples"]), Path(entry["index"]) if entry.get("index") else None,
                           dict(entry.get("skips") or {}), entry.get("size"), entry.get("mtime_ns"))
              for entry in manifest["shards"]]
    return shards, manifest["format"] == MANIFEST_FORMAT
