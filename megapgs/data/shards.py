"""Writing webdataset shards, and the manifest that tells a loader the epoch size without a scan.

A shard set is a folder of `0.tar, 1.tar, ...` (clip_benchmark's webdataset layout, with its
`nshards.txt`) plus `manifest.json`: the shard files in order with their sample counts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import webdataset as wds
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from megapgs.log import console

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "megapgs-shards/1"


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console)


def write_shards(samples: Iterable[dict], out_dir: Path, shard_size: int, total: int | None = None,
                 description: str = "writing shards") -> dict:
    """Write `samples` (webdataset dicts with a `__key__`) into `out_dir`; return the manifest.

    Shards hold `shard_size` samples each (the last one fewer). A progress bar shows the count.
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
    manifest = {
        "format": MANIFEST_FORMAT,
        "samples": sum(counts),
        "shards": [{"path": f"{i}.tar", "samples": n} for i, n in enumerate(counts)],
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    (out_dir / "nshards.txt").write_text(f"{len(counts)}\n")
    return manifest


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def read_manifest(path: Path) -> dict:
    """Read a manifest and return it with shard paths made absolute."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read shard manifest {path}: {err}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a megapgs shard manifest (format {manifest.get('format')!r})")
    for shard in manifest["shards"]:
        if "://" not in shard["path"] and not shard["path"].startswith("pipe:"):
            shard["path"] = str((path.parent / shard["path"]).resolve())
    return manifest


def iter_manifest_urls(manifest: dict) -> Iterator[str]:
    for shard in manifest["shards"]:
        yield shard["path"]
