"""Throughput of megapgs's training step beside OpenCLIP's: same architecture, same inputs, one process.

    python tools/profile_throughput.py --config configs/tiny_cpu.json --baseline openclip
    python tools/profile_throughput.py --config configs/vitb16_pgs05.json --batch 8 --data photos --baseline openclip
    python tools/profile_throughput.py --config configs/vitl_pgs03.json --batch 128 --data photos \\
        --baseline openclip --trace traces/                                   # on a GPU: bf16, MFU

Variants: megapgs as configured (its masking); megapgs with random masking at the kept share that
PGS realised (the implementation, at PGS's token count); megapgs unmasked; and with `--baseline
openclip`, OpenCLIP's model of the same towers unmasked, with patch dropout at the config's minimum
mask ratio (FLIP) and at PGS's realised share, each eager and compiled, with the config's activation
checkpointing and gradient clipping. One table: samples/s, image
tokens/s, realised kept share, MFU (GPUs with a known peak, FLOPs of the tokens computed), peak
memory, and the median step split into data, PGS, image tower, text tower, loss, backward and
optimizer (a feature cache's first pass, where accumulation needs one, counts in the towers and its
own column); then the ratios. `--data photos` feeds scikit-image's photos with short real captions,
`synthetic` random tensors, `shards` the configured loader (DALI on a GPU).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from megapgs.perf.flops import peak_flops  # noqa: E402
from megapgs.perf.profile import (Timing, profile_batches, profile_megapgs, profile_openclip,  # noqa: E402
                                  start_profile)
from megapgs.perf.timers import device_label  # noqa: E402

# the step's stages (StageTimer names) and their column titles; forward = PGS + both towers
STAGES = {"data": "data", "pgs": "pgs", "image_tower": "image", "text_tower": "text", "forward": "forward",
          "loss": "loss", "backward": "backward", "optimizer": "optim", "feature_cache": "cache"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="run config (default: the embedded default, configs/tiny_cpu.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--baseline", choices=("openclip", "none"), default="none")
    parser.add_argument("--compile", choices=("both", "eager", "compiled"), default="both",
                        help="which OpenCLIP baselines to time (compiling takes minutes on a CPU)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (medians)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, help="images per step (default: the config's micro batch)")
    parser.add_argument("--data", choices=("photos", "synthetic", "shards"), default="photos")
    parser.add_argument("--progress", type=float, default=0.5, help="training progress (PGS's token-similarity weight)")
    parser.add_argument("--trace", type=Path, metavar="DIR", help="write a torch.profiler trace of the configured run")
    return parser.parse_args(argv)


def row(timing: Timing, peak: float | None) -> str:
    mfu = timing.mfu(peak)
    memory = f"{timing.peak_memory_gib:8.2f}" if timing.peak_memory_gib is not None else "       -"
    stages = " ".join(f"{timing.stages_ms.get(s, 0.0):8.1f}" for s in STAGES)
    rates = f"{timing.samples_per_s:10.1f} {timing.image_tokens_per_s:11.0f} {timing.kept_share:6.3f}"
    return (f"{timing.name:<34} {rates} {'  -' if mfu is None else f'{100 * mfu:5.1f}%'} {memory} "
            f"{timing.step_ms:9.1f} | {stages}")


def main(argv=None) -> int:
    args = parse_args(argv)
    dist, configs = start_profile(args.config, args.overrides, args.batch, "the profiler")
    cfg = configs()
    batch = configs.batch
    from megapgs.models.archs import get_arch

    spec = get_arch(cfg.model.arch)
    device, bf16 = dist.device, cfg.precision == "bf16"
    peak = peak_flops(device)
    print(f"# {device_label(device)}; {cfg.model.arch} (L={spec.vision.num_patches}), batch {batch}, {cfg.precision}, "
          f"data {args.data}, masking {cfg.pgs.masking} (r_min {cfg.pgs.min_mask_ratio:g}), median of {args.steps} "
          f"steps after {args.warmup}")
    batches = profile_batches(args.data, cfg, dist, batch)
    timings = [profile_megapgs(cfg, dist, batches, f"megapgs {cfg.pgs.masking}", args.steps, args.warmup,
                               args.progress, args.trace)]
    share = timings[0].kept_share
    if cfg.pgs.masking == "pgs":  # the implementation at PGS's token count: random masking keeping that share
        timings.append(profile_megapgs(configs.random_keeping(share), dist, batches, f"megapgs random @{share:.2f}",
                                       args.steps, args.warmup, args.progress))
    if cfg.pgs.masking != "none":
        timings.append(profile_megapgs(configs("pgs.masking=none"), dist, batches, "megapgs unmasked", args.steps,
                                       args.warmup, args.progress))
    if args.baseline == "openclip":
        fixed = next(batches)
        drops = {"unmasked": 0.0, f"FLIP-{cfg.pgs.min_mask_ratio:g}": cfg.pgs.min_mask_ratio}
        if cfg.pgs.masking == "pgs":
            drops[f"dropout @{share:.2f}"] = 1 - share
        modes = {"both": (False, True), "eager": (False,), "compiled": (True,)}[args.compile]
        for compiled in modes:
            for label, drop in drops.items():
                name = f"OpenCLIP {label}{' compiled' if compiled else ''}"
                timings.append(profile_openclip(spec, fixed, name, drop, compiled, args.steps, args.warmup, device,
                                                bf16, cfg.model.grad_checkpointing,
                                                float(cfg.deepspeed.get("gradient_clipping", 0.0))))
    print(f"{'variant':<34} {'samples/s':>10} {'img tok/s':>11} {'kept':>6} {'MFU':>6} {'peak GiB':>8} "
          f"{'step ms':>9} | " + " ".join(f"{title:>8}" for title in STAGES.values()) + "   (ms per step)")
    for timing in timings:
        print(row(timing, peak))
    print_ratios(timings)
    return 0


def print_ratios(timings: list[Timing]) -> None:
    """Each megapgs variant against each OpenCLIP one (samples/s)."""
    ours = [t for t in timings if t.name.startswith("megapgs")]
    theirs = [t for t in timings if t.name.startswith("OpenCLIP")]
    if not theirs:
        return
    print("ratios of samples/s (megapgs / OpenCLIP):")
    for mine in ours:
        ratios = (f"{other.name.removeprefix('OpenCLIP ')} x{mine.samples_per_s / other.samples_per_s:.2f}"
                  for other in theirs)
        print(f"  {mine.name:<26} " + "  ".join(ratios))


if __name__ == "__main__":
    sys.exit(main())
