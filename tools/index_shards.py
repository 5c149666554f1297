"""Index webdataset shards made elsewhere (img2dataset's, say) once, so that no run reads them at start-up.

    python tools/index_shards.py '/data/laion400m/{00000..41407}.tar' --out /data/laion400m-index
    python tools/index_shards.py /data/cc12m/*.tar --out cc12m-index --processes 16
    # then: --set data.train_shards=/data/laion400m-index/manifest.json

Every shard is read once, in parallel processes: each sample's caption must be non-empty UTF-8 and
its image must parse and be complete (the CPU loader's rules). Into the output folder (the data set
may be read-only) go one checked DALI index and one record per shard, then `manifest.json`: the
shards in the given order with their good-sample counts, sizes and mtimes, and the skips by reason.
Killed half-way, it resumes where it stopped; run again on a grown data set, it reads only the new
or changed shards. img2dataset's layout is read as it is: `{key}.jpg`, `.txt`, `.json` per sample
(keys may carry a folder prefix); its `_stats.json` and `.parquet` files beside the shards are not
shards and are not listed.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import braceexpand  # noqa: E402

from megapgs.data.faults import DataError, SkipCounter  # noqa: E402
from megapgs.data.shard_index import index_shards  # noqa: E402
from megapgs.log import setup_logging  # noqa: E402
from megapgs.shm import sweep_stale_files  # noqa: E402


def shard_paths(patterns: list[str]) -> list[str]:
    """.tar files named by the arguments: brace patterns, files, or folders (their *.tar, sorted)."""
    paths: list[str] = []
    for pattern in patterns:
        for item in braceexpand.braceexpand(pattern):
            if Path(item).is_dir():
                paths += sorted(str(p) for p in Path(item).glob("*.tar"))
            else:
                paths.append(item)
    return list(dict.fromkeys(paths))  # each once, first place kept


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", nargs="+", help="shard files, brace patterns or folders of .tar files")
    parser.add_argument("--out", type=Path, required=True, help="the index folder (manifest.json goes there)")
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)),
                        help="worker processes (default: this machine's cores)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    setup_logging("info", rank=0)
    sweep_stale_files()  # a killed run's pool semaphores (its workers are spawned) stay in /dev/shm until then
    paths = shard_paths(args.shards)
    not_tar = [p for p in paths if not p.endswith(".tar")]
    if not_tar:
        print(f"error: not a .tar shard: {not_tar[0]}", file=sys.stderr)
        return 2
    if not paths:
        print("error: no shard named", file=sys.stderr)
        return 2
    try:
        manifest = index_shards(paths, args.out, processes=max(1, args.processes), progress=not args.no_progress)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(manifest['shards'])} shards, {manifest['samples']:,} good samples; "
          f"{SkipCounter(manifest['skips']).summary()}; manifest: {args.out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
