"""Writing webdataset shards, and the manifest that tells a loader the epoch size without a scan.

A shard set is a folder of `0.tar, 1.tar, ...` (clip_benchmark's webdataset layout, with its
`nshards.txt`), one DALI index per shard (`0.idx, ...`, the format of DALI's `wds2idx`), plus
`manifest.json`: the shard files in order with their sample counts and index files.
"""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Collection, Iterable, Iterator, Sequence

import webdataset as wds
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from webdataset.tariterators import base_plus_ext

from megapgs.atomic import write_json_atomic
from megapgs.data.faults import SkipCounter
from megapgs.log import console

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "megapgs-shards/2"     # checked indexes, with each shard's size, mtime and skips
UNCHECKED_FORMAT = "megapgs-shards/1"    # shards and counts only (and make_shards's before 2026-12-03)
READABLE_FORMATS = (UNCHECKED_FORMAT, MANIFEST_FORMAT)


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console)


def write_shards(samples: Iterable[dict], out_dir: Path, shard_size: int, total: int | None = None,
                 description: str = "writing shards", checked: bool = False) -> dict:
    """Write `samples` (webdataset dicts with a `__key__`) into `out_dir`; return the manifest.

    Shards hold `shard_size` samples each (the last one fewer). A progress bar shows the count.
    Each shard gets its DALI index (`{i}.idx`) once it is complete. `checked`: the caller checked
    every sample as the loaders would (`tools/make_shards.py` does), so the manifest says the indexes
    are checked ones (format /2, with each shard's size and mtime) and the GPU loaders take them as
    they are; otherwise the manifest lists the shards and counts (format /1) and a GPU run indexes
    them first (`shard_index`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: list[int] = []  # samples per shard, in shard order
    with progress_bar() as bar, wds.ShardWriter(str(out_dir / "%d.tar"), maxcount=shard_size, verbose=0, mtime=0) as sink:
        task = bar.add_task(description, total=total, rate="")
        for sample in samples:
            sink.write(sample)
            shard_index = sink.shard - 1  # ShardWriter numbers the shard it writes to, then counts on
            if shard_index == len(counts):
                counts.append(0)
                bar.update(task, rate=f"shard {shard_index}")
            counts[shard_index] += 1
            bar.advance(task)
    entries = []
    for i, count in enumerate(counts):
        write_dali_index(out_dir / f"{i}.tar", out_dir / f"{i}.idx")
        entry = {"path": f"{i}.tar", "samples": count, "index": f"{i}.idx"}
        if checked:  # every sample was checked: the full index is the checked one
            stat = (out_dir / f"{i}.tar").stat()
            entry.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns, skips={})
        entries.append(entry)
    manifest = {"format": MANIFEST_FORMAT if checked else UNCHECKED_FORMAT, "samples": sum(counts),
                "shards": entries}
    write_json_atomic(out_dir / MANIFEST, manifest)
    (out_dir / "nshards.txt").write_text(f"{len(counts)}\n")
    return manifest


def write_dali_index(tar_path: Path, idx_path: Path) -> int:
    """Write the index DALI's `fn.readers.webdataset` reads (`index_paths`); return the sample count.

    The format is DALI's `wds2idx` v1.2: a line `v1.2 <samples>`, then one line per sample with
    `<ext> <data offset> <size> <member name>` for each of its files, in tar order. `wds2idx`
    shells out to GNU tar twice per shard; reading the headers with tarfile gives the same text.
    """
    samples: list[list[str]] = []  # per sample: "ext offset size name" of each file
    last_key = None
    with tarfile.open(tar_path, mode="r:") as archive:
        for member in archive:
            if not member.isreg():
                continue
            name = member.name
            dot = name.find(".", name.rfind("/") + 1)
            key, ext = name[:dot], name[dot + 1:]
            if dot < 0 or not key or key.endswith("/"):
                continue
            entry = f"{ext} {member.offset_data} {member.size} {name}"
            if key != last_key:
                samples.append([entry])
                last_key = key
            else:
                samples[-1].append(entry)
    if not samples:
        raise ValueError(f"{tar_path} holds no samples; DALI cannot index an empty shard")
    idx_path.write_text(f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples))
    return len(samples)


def read_manifest(path: Path) -> dict:
    """Read a manifest and return it with shard paths made absolute."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read shard manifest {path}: {err}") from None
    if manifest.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path} is not a megapgs shard manifest (format {manifest.get('format')!r})")
    folder = Path(path).resolve().parent
    for shard in manifest["shards"]:
        if "://" not in shard["path"] and not shard["path"].startswith("pipe:"):
            shard["path"] = str((folder / shard["path"]).resolve())
        if shard.get("index"):
            shard["index"] = str((folder / shard["index"]).resolve())
    return manifest


def iter_manifest_urls(manifest: dict) -> Iterator[str]:
    for shard in manifest["shards"]:
        yield shard["path"]


# ----------------------------------------------------------------------------- reading

def read_shard(path: str, skips: SkipCounter, numbers: Collection[int] | None = None) -> Iterator[dict]:
    """The complete samples of one local shard, in tar order: webdataset dicts (`__key__`,
    `__url__`, one bytes value per extension, lower-cased). With `numbers`, only the samples of
    those numbers in tar order (0 first): the bytes of the others are not read, reading ends after
    the last, and a fault is counted only by the reader taking the sample it damaged (sample 0 for
    a missing or empty file), so readers of parts of a shard count each fault once.

    A missing or zero-byte file, a tar without samples, and a tar cut short or corrupt from some
    point on are counted in `skips` (`shard_missing`, `shard_empty`, `tar_truncated`); a truncated
    tar still yields the samples stored completely before the damage (but for the one before a
    damaged member header, which may lack members the reader cannot know of). webdataset's own tar
    iterator ends silently when a cut falls on a member header, so we read with tarfile and check
    that the archive ends with tar's end-of-archive block.
    """
    wanted = (lambda n: True) if numbers is None else numbers.__contains__
    stop = None if numbers is None else max(numbers, default=-1) + 1
    counted = skips if wanted(0) else SkipCounter()  # a fault of the whole file: the reader of sample 0
    try:
        stream = open(path, "rb")
    except OSError as err:
        counted.add("shard_missing", path, err.strerror or str(err))
        return
    with stream:
        size = os.fstat(stream.fileno()).st_size
        if size == 0:
            counted.add("shard_empty", path, "zero bytes")
            return
        sample: dict | None = None
        reading: str | None = None  # the key of the member being read
        begun = delivered = 0       # samples begun (their number in the tar), and yielded
        try:
            with tarfile.open(fileobj=stream, mode="r:") as archive:
                for member in archive:
                    archive.members = []  # tarfile keeps every header otherwise
                    if not member.isreg() or member.name.startswith("__"):
                        continue
                    key, ext = base_plus_ext(member.name)
                    if key is None:
                        continue
                    reading = key
                    if sample is None or key != sample["__key__"]:
                        if sample is not None and wanted(begun - 1):
                            yield sample
                            delivered += 1
                        if stop is not None and begun >= stop:
                            return
                        begun += 1
                        sample = {"__key__": key, "__url__": path}
                    if wanted(begun - 1):
                        sample[ext.lower()] = archive.extractfile(member).read()  # raises ReadError on a cut
                end_offset = archive.offset
            stream.seek(end_offset)
            if stream.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"no end-of-archive block at byte {end_offset} of {size}")
        except (tarfile.TarError, OSError, EOFError) as err:
            # The held sample is complete when the damage is in a member of the next sample; when
            # the damage is in a header we cannot know whose, so it is lost with the rest.
            if sample is not None and reading is not None and reading != sample["__key__"] and wanted(begun - 1):
                yield sample
                delivered += 1
            if wanted(max(begun - 1, 0)):
                where = f"after {delivered} samples" if numbers is None else f"at sample {max(begun - 1, 0)}"
                skips.add("tar_truncated", path, f"{where}: {err}")
            return
        if sample is not None and wanted(begun - 1):
            yield sample
            delivered += 1
        if begun == 0:
            counted.add("shard_empty", path, "a tar without samples")


def sample_counts(shards: Sequence[str]) -> list[int]:
    """Samples in each of these shards, as written: from the manifests beside them, else the first
    line of their DALI indexes, else a scan of their tar headers (local files only; 0 if missing)."""
    known: dict[str, int] = {}  # absolute shard path -> samples, from manifests
    for folder in {Path(s).resolve().parent for s in shards}:
        if (folder / MANIFEST).is_file():
            try:
                known.update((s["path"], s["samples"]) for s in read_manifest(folder / MANIFEST)["shards"])
            except (ValueError, KeyError):
                pass
    counts = []
    for shard in shards:
        path = Path(shard).resolve()
        if str(path) in known:
            counts.append(known[str(path)])
        elif path.with_suffix(".idx").is_file():
            counts.append(int(path.with_suffix(".idx").read_text().split(maxsplit=2)[1]))
        else:
            counts.append(_scan_count(str(path)) if path.is_file() else 0)
    return counts


def _scan_count(shard: str) -> int:
    """Samples in a tar by its member headers alone (no member is read)."""
    keys, last = 0, None
    try:
        with tarfile.open(shard, mode="r:") as archive:
            for member in archive:
                archive.members = []
                key, _ = base_plus_ext(member.name) if member.isreg() and not member.name.startswith("__") \
                    else (None, None)
                if key is not None and key != last:
                    keys, last = keys + 1, key
    except (tarfile.TarError, OSError, EOFError):
        pass  # counted up to the damage; reading it counts the fault
    return keys


def count_samples(shards: Sequence[str]) -> int:
    """Samples in these shards, as written (see `sample_counts`)."""
    return sum(sample_counts(shards))
