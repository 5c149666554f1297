"""Samples/s against the share of patches kept, megapgs beside OpenCLIP, in one process: a table and a PNG.

    python tools/plot_throughput.py --config configs/vitb16_pgs05.json --batch 8 \\
        --set deepspeed.bf16.enabled=false --set deepspeed.zero_optimization.stage=0 \\
        --kept 0.25 0.5 0.7 1.0 --out docs/throughput_vs_kept.png

At each kept share s: megapgs's training step with random masking keeping s of the patches (s = 1:
unmasked) and OpenCLIP's with patch dropout 1 - s (FLIP), the same towers, inputs and recipe as
tools/profile_throughput.py (`megapgs/perf/profile.py`); OpenCLIP eager by default (`--compiled`
adds its compiled step). One more point: megapgs with the config's own masking (PGS), at the share
PGS realised on these inputs. The same token count on both curves tells the implementations apart;
PGS's point shows where its masking lands.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megapgs.perf.profile import (Timing, profile_batches, profile_megapgs, profile_openclip,  # noqa: E402
                                  start_profile)
from megapgs.perf.timers import device_label  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="run config (default: the embedded default, configs/tiny_cpu.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--kept", type=float, nargs="+", default=[0.25, 0.5, 0.7, 1.0],
                        help="shares of the patches kept (0 < s <= 1)")
    parser.add_argument("--batch", type=int, help="images per step (default: the config's micro batch)")
    parser.add_argument("--data", choices=("photos", "synthetic"), default="photos")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per point (medians)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--compiled", action="store_true", help="also OpenCLIP under torch.compile (slow on a CPU)")
    parser.add_argument("--out", type=Path, default=Path("throughput_vs_kept.png"), help="the PNG to write")
    args = parser.parse_args(argv)
    if not all(0 < s <= 1 for s in args.kept):
        parser.error(f"--kept: every share must be in (0, 1], got {args.kept}")
    return args


def plot(curves: dict[str, list[Timing]], pgs: Timing | None, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for (name, timings), marker in zip(curves.items(), "os^v"):
        axes.plot([t.kept_share for t in timings], [t.samples_per_s for t in timings], marker=marker, label=name)
    if pgs is not None:
        axes.scatter([pgs.kept_share], [pgs.samples_per_s], marker="*", s=160, color="black", zorder=3,
                     label=f"{pgs.name} (kept {pgs.kept_share:.2f})")
    axes.set_xlabel("share of image patches computed (kept)")
    axes.set_ylabel("training samples/s")
    axes.set_xlim(0, 1.05)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    dist, configs = start_profile(args.config, args.overrides, args.batch, "the sweep")
    cfg = configs()
    from megapgs.models.archs import get_arch

    spec = get_arch(cfg.model.arch)
    header = (f"{device_label(dist.device)}\n{cfg.model.arch}, batch {configs.batch}, {cfg.precision}, "
              f"data {args.data}, median of {args.steps} steps after {args.warmup}")
    print("# " + header.replace("\n", "; "))
    batches = profile_batches(args.data, cfg, dist, configs.batch)
    fixed = next(batches)
    timing_args = (args.steps, args.warmup, 0.5)
    openclip_args = (dist.device, cfg.precision == "bf16", cfg.model.grad_checkpointing,
                     float(cfg.deepspeed.get("gradient_clipping", 0.0)))
    curves: dict[str, list[Timing]] = {"megapgs (random masking)": [], "OpenCLIP (patch dropout)": []}
    if args.compiled:
        curves["OpenCLIP compiled"] = []
    for share in sorted(args.kept):
        variant = configs("pgs.masking=none") if share == 1 else configs.random_keeping(share)
        curves["megapgs (random masking)"].append(
            profile_megapgs(variant, dist, batches, f"megapgs @{share:g}", *timing_args))
        for compiled in (False, True) if args.compiled else (False,):
            name = "OpenCLIP compiled" if compiled else "OpenCLIP (patch dropout)"
            curves[name].append(profile_openclip(spec, fixed, f"{name} @{share:g}", 1 - share, compiled,
                                                 args.steps, args.warmup, *openclip_args))
    pgs = None
    if cfg.pgs.masking == "pgs":
        pgs = profile_megapgs(cfg, dist, batches, f"megapgs PGS-{cfg.pgs.min_mask_ratio:g}", *timing_args)
    print(f"{'kept (asked)':>12} | " + " | ".join(f"{name:>26}" for name in curves) + " | megapgs / OpenCLIP eager")
    for i, share in enumerate(sorted(args.kept)):
        cells = [f"{t[i].samples_per_s:9.1f}/s (kept {t[i].kept_share:.3f})" for t in curves.values()]
        ratio = curves["megapgs (random masking)"][i].samples_per_s / curves["OpenCLIP (patch dropout)"][i].samples_per_s
        print(f"{share:12g} | " + " | ".join(f"{c:>26}" for c in cells) + f" | x{ratio:.2f}")
    if pgs is not None:
        print(f"{pgs.name}: {pgs.samples_per_s:.1f} samples/s at kept {pgs.kept_share:.3f}")
    plot(curves, pgs, header, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
