"""Start-up against the size of the data set: index many small shards, then time two ranks from their
launch to the first training step, with the webdataset loader and with DALI (CPU mode here).

    python tools/bench_startup.py --shards 400 4000 40000 --out /tmp/startup
    python tools/bench_startup.py --shards 40000 --kill-index-at 0.5 --out /tmp/startup   # resume check

For each size: N shards of a few Fashion-MNIST test images each (written once into OUT), indexed by
tools/index_shards.py (its wall clock; with --kill-index-at, killed part-way and resumed, and its
manifest compared with an uninterrupted run's); then `torch.distributed.run` with 2 ranks of
launch/pretrain.py on that manifest (tiny-28, one step), per loader: seconds from the launch to the
first step's record in metrics.jsonl, and the peak resident memory of each rank.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from megapgs.data.fashion_mnist import RAW_FILES, read_idx  # noqa: E402


def write_small_shards(folder: Path, count: int, per_shard: int, raw_dir: Path) -> list[str]:
    """`count` shards of `per_shard` Fashion-MNIST test images (PNG) with captions; kept when present."""
    folder.mkdir(parents=True, exist_ok=True)
    images = read_idx(raw_dir / RAW_FILES["test"][0])
    paths = [folder / f"{i:06d}.tar" for i in range(count)]
    encoded: dict[int, bytes] = {}
    started = time.perf_counter()
    for shard, path in enumerate(paths):
        if path.is_file():
            continue
        partial = path.with_suffix(".tmp")
        with tarfile.open(partial, "w") as archive:
            for i in range(per_shard):
                n = (shard * per_shard + i) % len(images)
                if n not in encoded:
                    buffer = io.BytesIO()
                    Image.fromarray(np.asarray(images[n], dtype=np.uint8)).save(buffer, format="PNG")
                    encoded[n] = buffer.getvalue()
                for ext, data in (("png", encoded[n]), ("txt", f"a photo, item {n}".encode())):
                    info = tarfile.TarInfo(f"{shard:06d}_{i}.{ext}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        os.replace(partial, path)
    if time.perf_counter() - started > 1:
        print(f"  wrote {count} shards in {time.perf_counter() - started:.0f} s", flush=True)
    return [str(p) for p in paths]


def index(folder: Path, out: Path, kill_at: float | None) -> float:
    """Seconds tools/index_shards.py takes (in all, over its runs)."""
    cmd = [sys.executable, "tools/index_shards.py", str(folder), "--out", str(out), "--no-progress"]
    started = time.perf_counter()
    if kill_at is not None:
        total = len(list(folder.glob("*.tar")))
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        while len(list((out / "shards").rglob("*.json"))) < kill_at * total and proc.poll() is None:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"  index killed at {len(list((out / 'shards').rglob('*.json')))} of {total} records", flush=True)
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"index_shards failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def peak_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def first_step(manifest: Path, loader: str, run_dir: Path, port: int) -> tuple[float, list[float]]:
    """(seconds from the launch to step 1's record, peak RSS of each rank in MiB)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "launch/pretrain.py", "--set", "data.source=webdataset", "--set", f"data.train_shards={manifest}",
           "--set", f"data.loader={loader}", "--set", "data.workers=0", "--set", "train.steps=1",
           "--set", "train.global_batch_size=32", "--set", "train.micro_batch_size=16", "--set", "eval.zeroshot=false",
           "--set", "eval.retrieval=false", "--set", "log.every_steps=1", "--set", "log.progress=false",
           "--set", "log.tensorboard=false", "--set", "train.checkpoint_every=0", "--set", f"train.output_dir={run_dir}"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics, seconds, peaks = run_dir / "metrics.jsonl", None, {}
    while proc.poll() is None:
        ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in ranks:  # the launcher's children (each in a session of its own)
            peaks[pid] = max(peaks.get(pid, 0.0), peak_rss_mib(int(pid)))
        if seconds is None and metrics.is_file() and '"step": 1' in metrics.read_text():
            seconds = time.perf_counter() - started
        time.sleep(0.1)
    output = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"the {loader} run failed:\n{output[-3000:]}")
    ranks = sorted(peaks.values(), reverse=True)[:2]
    return seconds if seconds is not None else time.perf_counter() - started, ranks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[400, 4000, 40000])
    parser.add_argument("--per-shard", type=int, default=3)
    parser.add_argument("--loaders", nargs="+", default=["wds", "dali"], choices=["wds", "dali"])
    parser.add_argument("--kill-index-at", type=float, help="kill index_shards at this share of its records, resume")
    parser.add_argument("--fashion-mnist-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    print(f"# 2 ranks (torch.distributed.run, gloo), tiny-28, {args.per_shard} samples a shard; "
          f"{os.cpu_count()} cores", flush=True)
    print(f"{'shards':>7} {'index s':>8} {'loader':>6} {'to step 1 s':>12} {'peak RSS MiB (rank 0, 1)':>26}", flush=True)
    for port, count in enumerate(args.shards, start=29700):
        folder = args.out / f"shards_{count}"
        write_small_shards(folder, count, args.per_shard, args.fashion_mnist_dir)
        out = args.out / f"index_{count}"
        seconds = index(folder, out, args.kill_index_at)
        if args.kill_index_at is not None:
            whole = args.out / f"index_{count}_whole"
            index(folder, whole, None)
            same = (json.loads((out / "manifest.json").read_text())["shards"]
                    == json.loads((whole / "manifest.json").read_text())["shards"])
            print(f"  resumed manifest equal to an uninterrupted run's: {same}", flush=True)
        for i, loader in enumerate(args.loaders):
            took, peaks = first_step(out / "manifest.json", loader, args.out / f"run_{count}_{loader}", port + 10 * i)
            print(f"{count:>7} {seconds:>8.1f} {loader:>6} {took:>12.1f} {', '.join(f'{p:.0f}' for p in peaks):>26}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
