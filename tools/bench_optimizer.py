"""Time one AdamW step of a CLIP's parameters for each of PyTorch's implementations.

    python tools/bench_optimizer.py                       # tiny-28 on the CPU
    python tools/bench_optimizer.py --arch ViT-B-16 --device cuda

Prints the median time of `optimizer.step()` (the engine's parameter groups, random gradients) for
the single-tensor loop (PyTorch's default on the CPU), foreach and fused (what megapgs uses).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from megapgs.models.archs import ArchError, get_arch  # noqa: E402
from megapgs.models.clip import CLIP  # noqa: E402
from megapgs.perf.timers import device_label, median_ms  # noqa: E402
from megapgs.train.engine import param_groups  # noqa: E402

VARIANTS = {"single-tensor": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tiny-28", help="a model.arch value (python -m megapgs.config --explain)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    try:
        spec = get_arch(args.arch)
    except ArchError as err:
        parser.error(f"--arch: {err}")
    model = CLIP(spec).to(device)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    count = sum(p.numel() for p in model.parameters())
    print(f"# {device_label(device)}; {args.arch}, {count / 1e6:.1f} M parameters, fp32; median of {args.repeats}")
    baseline = None
    for name, options in VARIANTS.items():
        optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, **options)
        ms = median_ms(optimizer.step, device, args.repeats)
        baseline = baseline or ms
        print(f"{name:>14}: {ms:8.2f} ms   x{baseline / ms:.2f} vs single-tensor")


if __name__ == "__main__":
    main()
