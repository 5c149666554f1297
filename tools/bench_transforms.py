"""The loader's per-image tensor work: torchvision's ToTensor + Normalize per image (what the loaders
did before 2026-12-03) against megapgs.data.transforms (uint8 pixels per image, normalised into one
batch), on the same random images, interleaved in one process so that a noisy machine slows both alike.

    python tools/bench_transforms.py                  # 28 px (the embedded default) and 224 px
    python tools/bench_transforms.py --sizes 224 --threads 1 --repeats 50
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: E402
from PIL import Image  # noqa: E402

from megapgs.data.transforms import normalize, pixels_of  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 224])
    parser.add_argument("--batch", type=int, help="images per batch (default: 128 below 100 px, else 32)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# cpu ({args.threads} threads), torch {torch.__version__}; median of {args.repeats} interleaved runs")
    print(f"{'size':>5} {'batch':>6} {'torchvision per image':>22} {'megapgs':>9} {'ratio':>7}   (microseconds an image)")
    for size in args.sizes:
        batch = args.batch or (128 if size < 100 else 32)
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(batch)]

        def torchvision_per_image():
            return torch.stack([TF.normalize(TF.to_tensor(im), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
                                for im in images])

        def megapgs():
            return normalize([pixels_of(im) for im in images])

        if not torch.equal(torchvision_per_image(), megapgs()):
            print("error: the two paths disagree", file=sys.stderr)
            return 1
        times: dict[str, list[float]] = {"torchvision": [], "megapgs": []}
        for _ in range(args.repeats):
            for name, fn in (("torchvision", torchvision_per_image), ("megapgs", megapgs)):
                started = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - started) * 1e6 / batch)
        old, new = (statistics.median(times[name]) for name in ("torchvision", "megapgs"))
        print(f"{size:>5} {batch:>6} {old:>22.1f} {new:>9.1f} {old / new:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
