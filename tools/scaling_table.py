"""The tables of docs/SCALING.md: samples/s per GPU from FLOPs at a stated utilisation, communication
per step under ZeRO-1 and ZeRO-3 and the scaling efficiency it implies, memory per GPU from the dry run,
and GPU-days, for the large configs, beside published runs counted with the same FLOP counter.

    python tools/scaling_table.py                                   # the four large configs, H100 nodes
    python tools/scaling_table.py --configs configs/vitl_pgs03.json --utilisation 0.3 --worlds 8 64

No GPU is used or needed: every figure is arithmetic on megapgs's own counts (megapgs/perf/scaling.py,
throughput.py, comm.py, memory.py), except the kept share, which megapgs's PGS selection measures on
scikit-image's photos at each config's image and patch size, and the published figures below.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megapgs.config import load_config  # noqa: E402
from megapgs.models.archs import get_arch  # noqa: E402
from megapgs.perf.comm import H100_NODE, Fabric  # noqa: E402
from megapgs.perf.flops import PEAK_BF16_FLOPS  # noqa: E402
from megapgs.perf.param_count import count_params  # noqa: E402
from megapgs.perf.scaling import at_world, gpu_days, plan_for, run_work, scaling_point  # noqa: E402
from megapgs.perf.throughput import Keep, forward_flops, measured_keep  # noqa: E402

CONFIGS = ["configs/vitl_pgs03.json", "configs/vitl_pgs05.json", "configs/vith_pgs03.json", "configs/vitg_pgs03.json"]
GIB = 2**30

# Published training throughput, unmasked, 77-token captions: (what, arch, GPU, samples/s per GPU, source).
PUBLISHED = [
    ("OpenCLIP ViT-L/14, LAION-400M, 400 A100-40GB: 32 x 407,332,084 samples in 50,800 GPU-hours", "ViT-L-14", "A100",
     32 * 407_332_084 / (50_800 * 3600),
     "mlfoundations/open_clip docs/PRETRAINED.md; epoch: LAION-AI/scaling-laws-openclip trained_models_info.csv"),
    ("OpenCLIP ViT-H/14, LAION-2B, 824 A100-40GB, 34,608 samples/s", "ViT-H-14", "A100", 34_608 / 824,
     "LAION-AI/scaling-laws-openclip trained_models_info.csv (laion2b_s32b_b79k)"),
    ("OpenCLIP ViT-g/14, LAION-2B, 800 A100-40GB, 24,800 samples/s", "ViT-g-14", "A100", 24_800 / 800,
     "LAION-AI/scaling-laws-openclip trained_models_info.csv (laion2b_s12b_b42k)"),
    ("NeMo ViT-g/14, 1 node of 8 H100-80GB, 935 samples/s", "ViT-g-14", "H100", 935 / 8,
     "NVIDIA NeMo Framework user guide, CLIP performance"),
    ("NeMo ViT-g/14, 16 nodes of 8 H100-80GB, 13,829 samples/s", "ViT-g-14", "H100", 13_829 / 128,
     "NVIDIA NeMo Framework user guide, CLIP performance"),
]


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(*cells) -> str:
    return row(*cells) + "\n" + row(*["---"] * len(cells))


def published_table(peaks: dict[str, float]) -> None:
    print("\n### Published runs, counted with megapgs's FLOP counter (model FLOPs: 3 x forward, 77-token captions)\n")
    print(header("run", "samples/s per GPU", "GFLOPs per sample", "MFU", "source"))
    for what, arch_name, gpu, rate, source in PUBLISHED:
        arch = get_arch(arch_name)
        full = Keep.uniform(arch.vision.num_patches + 1)
        flops = 3 * forward_flops(arch, full.mean_len, full.mean_sq_len, 77)
        print(row(what, f"{rate:.1f}", f"{flops / 1e9:.0f}", f"{flops * rate / peaks[gpu]:.1%}", source))


def work_table(paths: list[str], keeps: dict[str, Keep], worlds: list[int], utils: list[float], peak: float,
               captions: int) -> None:
    print(f"\n### Work per sample and samples/s per H100 (compute alone; {worlds[0]} GPUs: the feature cache's "
          "extra forward included where the global batch takes accumulation)\n")
    print(header("config", "kept share (photos)", "packing", "image rows per image", "model GFLOPs",
                 "executed GFLOPs", *[f"samples/s at {u:.0%}" for u in utils], *[f"MFU at {u:.0%}" for u in utils]))
    for path in paths:
        cfg = at_world(load_config(path), worlds[0])
        plan = plan_for(cfg, worlds[0])
        keep = keeps[path]
        L = plan.arch.vision.num_patches
        for static in (True, False):
            work = run_work(cfg, plan, keep, captions, static=static)
            from megapgs.perf.throughput import image_rows

            rows = image_rows(plan.arch, cfg.pgs, keep, static, plan.micro_batch_size)[0]
            rates = [work.samples_per_s(peak, u) for u in utils]
            print(row(Path(path).stem, f"{keep.kept_share(L):.3f}", "static budget (CUDA default)" if static else "exact",
                      f"{rows:.0f} of {L + 1}", f"{work.model_flops / 1e9:.0f}", f"{work.executed_flops / 1e9:.0f}",
                      *[f"{r:.0f}" for r in rates], *[f"{work.model_flops * r / peak:.0%}" for r in rates]))


def scaling_tables(paths: list[str], keeps: dict[str, Keep], worlds: list[int], util: float, peak: float,
                   fabric: Fabric, captions: int) -> None:
    for path in paths:
        cfg = load_config(path)
        print(f"\n### {Path(path).stem}: communication per step per GPU and scaling efficiency "
              f"(compute at {util:.0%} of peak; configured ZeRO-{cfg.zero_stage})\n")
        print(header("GPUs", "micro x accum", "compute per step", "ZeRO-1 GB sent", "ZeRO-1 comm",
                     "ZeRO-1 eff. (no overlap / full)", "ZeRO-3 GB sent", "ZeRO-3 comm",
                     "ZeRO-3 eff. (no overlap / full)"))
        for n in worlds:
            p = scaling_point(cfg, n, keeps[path], captions, peak, util, fabric)
            cells = []
            for stage in (1, 3):
                cells += [f"{p.comm_bytes[stage] / 1e9:.2f}", f"{p.comm_s[stage] * 1e3:.0f} ms",
                          f"{p.efficiency(stage, 'none'):.0%} / {p.efficiency(stage, 'full'):.0%}"]
            print(row(n, f"{p.micro_batch} x {p.accum}", f"{p.compute_s * 1e3:.0f} ms", *cells))


def memory_table(paths: list[str], worlds: list[int]) -> None:
    from megapgs.perf.dry_run import estimate_for

    print("\n### Memory per GPU from the dry run (GiB; an 80 GB H100 has 79.6)\n")
    print(header("config", "GPUs", "micro batch", "configured", "peak", "with checkpointing flipped",
                 "the other ZeRO stage"))
    for path in paths:
        for n in worlds:
            cfg = at_world(load_config(path), n)
            est = estimate_for(cfg, n, "cuda")
            other_stage = 1 if cfg.zero_stage == 3 else 3
            zero = dict(cfg.deepspeed.get("zero_optimization", {}), stage=other_stage)
            other = estimate_for(cfg.model_copy(update={"deepspeed": dict(cfg.deepspeed, zero_optimization=zero)}),
                                 n, "cuda")
            flipped = "off" if cfg.model.grad_checkpointing else "on"
            print(row(Path(path).stem, n, cfg.train.micro_batch_size,
                      f"ZeRO-{cfg.zero_stage}, checkpointing {'on' if cfg.model.grad_checkpointing else 'off'}",
                      f"{est.peak_bytes / GIB:.1f}", f"{est.peak_with_other_checkpointing() / GIB:.1f} ({flipped})",
                      f"{other.peak_bytes / GIB:.1f} (ZeRO-{other_stage})"))


def days_table(paths: list[str], keeps: dict[str, Keep], world: int, utils: list[float], peak: float,
               fabric: Fabric, captions: int, samples: list[float]) -> None:
    print(f"\n### GPU-days on H100s ({world} GPUs: the configured ZeRO stage's efficiency without overlap; "
          "the unmasked tail at its own cost)\n")
    print(header("config", "utilisation", "samples/s per GPU", "efficiency", *[f"{s / 1e9:g}B samples" for s in samples]))
    for path in paths:
        cfg = load_config(path)
        for u in utils:
            p = scaling_point(cfg, world, keeps[path], captions, peak, u, fabric)
            plan = plan_for(at_world(cfg, world), world)
            rate = run_work(at_world(cfg, world), plan, keeps[path], captions).samples_per_s(peak, u)
            eff = p.efficiency(cfg.zero_stage, "none")
            print(row(Path(path).stem, f"{u:.0%}", f"{rate:.0f}", f"{eff:.0%}",
                      *[f"{gpu_days(s, rate, eff):,.0f}" for s in samples]))
    for what, _, gpu, rate, _ in PUBLISHED[:1] + PUBLISHED[3:4]:
        print(row(what.split(",")[0] + f" (published, {gpu})", "", f"{rate:.0f}", "",
                  *[f"{gpu_days(s, rate):,.0f}" for s in samples]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--utilisation", type=float, nargs="+", default=[0.2, 0.4],
                        help="shares of the H100's dense bf16 peak the executed FLOPs run at (stated, not measured)")
    parser.add_argument("--caption-tokens", type=int, default=77, help="text rows per sample (77: the whole context)")
    parser.add_argument("--samples", type=float, nargs="+", default=[1e9, 5e9, 12.8e9])
    parser.add_argument("--days-world", type=int, default=64, help="GPUs for the GPU-days table")
    args = parser.parse_args(argv)

    root = Path(__file__).resolve().parent.parent
    paths = [str(root / p) if not Path(p).is_absolute() else p for p in args.configs]
    peak = PEAK_BF16_FLOPS["H100"]
    keeps = {p: measured_keep(get_arch(load_config(p).model.arch), load_config(p).pgs) for p in paths}
    print(f"H100 SXM: {peak / 1e12:.0f} TFLOP/s dense bf16; NVLink {H100_NODE.nvlink / 1e9:.0f} GB/s and InfiniBand "
          f"{H100_NODE.network / 1e9:.0f} GB/s per GPU each way, collectives at {H100_NODE.efficiency:.0%} of it; "
          f"captions at {args.caption_tokens} tokens")
    for p in paths:
        counts, _ = count_params(get_arch(load_config(p).model.arch))
        print(f"{Path(p).stem}: {load_config(p).model.arch}, {counts.total:,} parameters")
    published_table({"A100": PEAK_BF16_FLOPS["A100"], "H100": peak})
    work_table(paths, keeps, args.worlds, args.utilisation, peak, args.caption_tokens)
    scaling_tables(paths, keeps, args.worlds, max(args.utilisation), peak, H100_NODE, args.caption_tokens)
    memory_table(paths, [args.worlds[0], args.days_world, args.worlds[-1]])
    days_table(paths, keeps, args.days_world, args.utilisation, peak, H100_NODE, args.caption_tokens, args.samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
