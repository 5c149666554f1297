"""Loader throughput: images/s (per worker) on 224-px JPEGs (decode, random resized crop,
normalise, tokenize, batch), on a temporary shard set cut from scikit-image's photos.

    python tools/bench_loader.py                       # the CPU loader; workers 0, 1 and 2, median of 3
    python tools/bench_loader.py --workers 1 4 8 --batches 40
    python tools/bench_loader.py --loader dali --device cuda --workers 8 --batch-size 256 --samples 16384
    python tools/bench_loader.py --loader nvjpeg --device cuda --workers 8 --batch-size 256 --samples 16384

For dali and nvjpeg, `--workers` is the decoding thread count and `--device cpu` runs their CPU twins.
"""
from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from megapgs.config import DataConfig  # noqa: E402
from megapgs.data.photos import PHOTOS, load_photo  # noqa: E402
from megapgs.data.shard_index import read_index_manifest  # noqa: E402
from megapgs.data.shards import MANIFEST, write_shards  # noqa: E402
from megapgs.data.tokenizer import Tokenizer  # noqa: E402
from megapgs.data.wds import build_train_loader  # noqa: E402


def photo_samples(count: int, size: int = 224, source_size: int = 320, seed: int = 0):
    """`count` distinct size x size JPEGs (quality 90): random crops and flips of the photos."""
    rng = random.Random(seed)
    sources = [(load_photo(name, source_size) * 255).round().byte().permute(1, 2, 0).numpy() for name in PHOTOS]
    for index in range(count):
        pixels = sources[index % len(sources)]
        top, left = rng.randint(0, source_size - size), rng.randint(0, source_size - size)
        image = Image.fromarray(pixels[top:top + size, left:left + size])
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        yield {"__key__": f"{index:06d}", "jpg": buffer.getvalue(),
               "txt": f"a photo of the {PHOTOS[index % len(PHOTOS)]}, crop {index}"}


def build(kind: str, device: str, cfg: DataConfig, shards: list[str], batch_size: int):
    common = dict(image_size=224, tokenizer=Tokenizer("ViT-B-16"), batch_size=batch_size, rank=0, world_size=1, seed=0)
    if kind == "wds":
        return build_train_loader(cfg, shards, **common)
    indexed, _ = read_index_manifest(Path(shards[0]).parent / MANIFEST)  # make_shards's: checked indexes
    if kind == "dali":
        from megapgs.data.dali import build_dali_loader

        return build_dali_loader(cfg, indexed, device=device, **common)
    from megapgs.data.nvjpeg import build_nvjpeg_loader
    from megapgs.train.inputs import EndlessFullBatches

    return EndlessFullBatches(build_nvjpeg_loader(cfg, indexed, device=device, **common), batch_size)


def images_per_second(kind: str, device: str, root: str, shards: list[str], workers: int, batch_size: int,
                      batches: int, warmup: int) -> float:
    cfg = DataConfig(root=root, workers=workers, shuffle_buffer=256, augment=True)
    stream = iter(build(kind, device, cfg, shards, batch_size))
    for _ in range(warmup):  # worker start-up and the first shuffle-buffer fill
        next(stream)
    started = time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
    if batch.images.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    stream.close()  # stops the loader's worker processes
    return batches * batch_size / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loader", choices=("wds", "dali", "nvjpeg"), default="wds")
    parser.add_argument("--device", default="cpu", help="dali / nvjpeg: cuda, or cpu for their CPU twins")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=1024, help="JPEGs in the temporary shard set")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=24, help="timed batches per run")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the loader's work is PIL's; keep torch from fanning out over the cores
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as folder:
        write_shards(photo_samples(args.samples), Path(folder), shard_size=64, total=args.samples,
                     description="224-px JPEG shards", checked=True)  # made here from good JPEGs
        shards = [str(p) for p in sorted(Path(folder).glob("*.tar"), key=lambda p: int(p.stem))]
        print(f"command: python tools/bench_loader.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
        print(f"{args.loader} loader on {args.device}: {args.samples} JPEGs of 224x224 in {len(shards)} shards; "
              f"batch {args.batch_size}, "
              f"{args.batches} timed batches, median of {args.repeats}; torch {torch.__version__}")
        for workers in args.workers:
            rates = [images_per_second(args.loader, args.device, folder, shards, workers, args.batch_size,
                                       args.batches, args.warmup) for _ in range(args.repeats)]
            rate = statistics.median(rates)
            print(f"workers={workers}: {rate:7.1f} images/s in all, {rate / max(workers, 1):7.1f} per worker "
                  f"(runs: {', '.join(f'{r:.1f}' for r in rates)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
