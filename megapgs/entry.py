"""The command line of `pretrain.py` and `launch/pretrain.py`: config -> ranks -> data -> plan -> run.

    python pretrain.py                                   # the embedded default, configs/tiny_cpu.json
    python pretrain.py --config configs/vitb16_pgs03.json --set train.steps=100
    deepspeed --hostfile launch/hostfile launch/pretrain.py --config configs/vitl_pgs03.json

Under `deepspeed` the launcher exports RANK/LOCAL_RANK/WORLD_SIZE and appends `--local_rank`;
a plain `python` run is one rank.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from rich.table import Table

from megapgs import exit_codes
from megapgs.config import ConfigError, load_config
from megapgs.data.prepare import DataError, prepare_data
from megapgs.dist import init_distributed
from megapgs.log import console, setup_logging
from megapgs.packed import Packed
from megapgs.train.checkpoint import complete_checkpoints
from megapgs.train.engine import InitWeightsError
from megapgs.train.loop import RunSummary, train
from megapgs.train.plan import RunPlan, plan_run
from megapgs.train.preempt import PREEMPTED_EXIT
from megapgs.train.reshard import ReshardError
from megapgs.train.resume_check import ResumeRefused, check_resume
from megapgs.train.safe_load import UnsafeCheckpointError
from megapgs.train.start import StartError, decide_start
from megapgs.train.storage import DiskFullError, OutputDirError, disk_full_message, is_out_of_space, prepare_output_dir

log = logging.getLogger("megapgs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain.py", description="Train a CLIP model with PGS masking.")
    parser.add_argument("--config", metavar="PATH",
                        help="run config JSON (default: configs/tiny_cpu.json, the embedded default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one config value, e.g. --set optim.lr=5e-4 (repeatable); "
                             "see `python -m megapgs.config --explain`")
    parser.add_argument("--resume", metavar="WHAT", help="same as --set train.resume=WHAT (auto, none, a path)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed's
    parser.add_argument("--dry-run", action="store_true", help="print the resolved run and its estimated memory "
                        "per rank (megapgs/perf/dry_run.py), then exit: no model, no DeepSpeed, no shard read")
    parser.add_argument("--world-size", type=int, metavar="N", help="with --dry-run: ranks to plan for "
                        "(default: WORLD_SIZE, else 1)")
    return parser


def plan_table(cfg, plan: RunPlan, data_text: str) -> Table:
    table = Table(title="megapgs run", show_header=False, title_justify="left")
    k_min, k_max = plan.kept_tokens
    kept = f"{k_min}..{k_max} of {plan.image_tokens} patches" if k_min != k_max else \
        f"{k_max} of {plan.image_tokens} patches"
    epochs = f" (~{plan.epochs:.2f} epochs)" if plan.epochs else ""
    rows = [
        ("model", f"{cfg.model.arch} (embed {plan.arch.embed_dim}, vision {plan.arch.vision.layers}x"
                  f"{plan.arch.vision.width}, text {plan.arch.text.layers}x{plan.arch.text.width}), "
                  f"attention {cfg.model.attention}"),
        ("masking", f"{cfg.pgs.masking}: keeps {kept} per image in training" + (
            f", the last {round(cfg.pgs.unmasked_tail * plan.total_steps):,} steps unmasked"
            if cfg.pgs.masking != "none" and cfg.pgs.unmasked_tail else "") + (
            f"; packed into a static budget of {Packed.budget_for(plan.micro_batch_size, k_min + 1, k_max + 1)[0]:,} "
            "tokens per micro-batch" if cfg.pgs.masking == "pgs" and plan.static_packing else "")),
        ("data", data_text),
        ("batch", f"{plan.global_batch_size} = {plan.micro_batch_size} per rank x {plan.world_size} ranks "
                  f"x {plan.grad_accum_steps} accumulation"),
        ("contrastive", f"{plan.contrastive_batch_size:,} pairs per loss" + (
            " (the global batch; features cached over the accumulation, one more forward per micro-batch)"
            if plan.feature_caching else " (the global batch)" if plan.contrastive_batch_size == plan.global_batch_size
            else f" (each micro-batch alone, not the global {plan.global_batch_size:,}: train.contrastive_batch)")),
        ("schedule", f"{plan.total_steps:,} steps{epochs}, lr {cfg.optim.lr:g} ({cfg.optim.schedule}, "
                     f"{cfg.optim.warmup_steps} warmup)"),
        ("engine", f"DeepSpeed ZeRO-{cfg.zero_stage}, {cfg.precision}" + (
            f", gradients accumulated in {cfg.deepspeed.get('data_types', {}).get('grad_accum_dtype', 'fp32')}"
            if cfg.precision == "bf16" else "") + (", compiled blocks" if cfg.model.compile else "")),
        ("output", cfg.train.output_dir),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one rank; returns its exit code (megapgs/exit_codes.py)."""
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    if args.dry_run:
        from megapgs.perf.dry_run import dry_run

        return dry_run(cfg, args.world_size)
    dist = init_distributed()
    setup_logging(cfg.log.level, dist.rank)
    started = time.perf_counter()
    try:
        prepare_output_dir(cfg.train.output_dir)
        start = decide_start(cfg)
        accepted = check_resume(cfg, start.resume_from) if start.resume_from is not None else []
        data = prepare_data(cfg, dist)
        plan = plan_run(cfg, dist, data)
    except OutputDirError as err:
        log.error("%s", err)
        return exit_codes.OUTPUT_DIR
    except ResumeRefused as err:
        log.error("%s", err)
        return exit_codes.RESUME_REFUSED
    except (ConfigError, DataError, FileNotFoundError, StartError) as err:
        log.error("%s", err)
        return exit_codes.BAD_INPUT
    except OSError as err:
        if not is_out_of_space(err):
            raise
        log.error("%s", disk_full_message("preparing the run", Path(err.filename or cfg.train.output_dir), err, None))
        return exit_codes.DISK_FULL
    if dist.is_main:
        console.print(plan_table(cfg, plan, data.describe()))
        if accepted:
            log.info("resuming %s with changed settings: %s", start.resume_from, "; ".join(accepted))
        log.info("config valid, data ready in %.1f s", time.perf_counter() - started)
    try:
        summary = train(cfg, dist, data, plan, start)
    except (DataError, InitWeightsError, UnsafeCheckpointError) as err:
        log.error("%s", err)
        return exit_codes.BAD_INPUT
    except ReshardError as err:
        log.error("%s", err)
        return exit_codes.RESUME_REFUSED
    except DiskFullError as err:
        log.error("%s", err)
        return exit_codes.DISK_FULL
    except OSError as err:  # the logs or metrics, say, on a disk that filled
        if not is_out_of_space(err):
            raise
        ckpt_dir = Path(cfg.train.output_dir) / "checkpoints"
        complete = complete_checkpoints(ckpt_dir)
        log.error("%s", disk_full_message(f"writing {err.filename or cfg.train.output_dir}", ckpt_dir, err,
                                          complete[-1] if complete else None))
        return exit_codes.DISK_FULL
    if dist.is_main:
        print(summary_line(summary, cfg.train.output_dir), flush=True)
    return exit_codes.PREEMPTED if summary.stopped_by else exit_codes.OK


def summary_line(summary: RunSummary, output_dir: str) -> str:
    """The one line a run ends with: what was trained, how fast, and how good it is."""
    if summary.stopped_by:
        return (f"megapgs: stopped by {summary.stopped_by} after {summary.steps_run:,} steps (at step "
                f"{summary.final_step:,}, {summary.samples_seen:,} samples); checkpoint written to "
                f"{output_dir}/checkpoints; continue with --resume auto (exit code {PREEMPTED_EXIT}).")
    parts = [f"megapgs: trained {summary.steps_run:,} steps (to step {summary.final_step:,}, "
             f"{summary.samples_seen:,} samples) in {summary.training_seconds / 60:.1f} min of training "
             f"({summary.seconds / 60:.1f} min with checkpoints and evaluation)"]
    if summary.last_loss is not None:
        parts.append(f"final loss {summary.last_loss:.4f}")
    if "zeroshot_top1" in summary.eval:
        parts.append(f"zero-shot top-1 {summary.eval['zeroshot_top1']:.2f}% "
                     f"(top-5 {summary.eval['zeroshot_top5']:.2f}%) on {int(summary.eval['eval_samples']):,} "
                     "held-out images")
    if "image_to_text_R@1" in summary.eval:
        parts.append(f"retrieval R@1 image->text {summary.eval['image_to_text_R@1']:.2f}%, "
                     f"text->image {summary.eval['text_to_image_R@1']:.2f}%")
    skipped = sum(summary.skips.values())
    parts.append(f"skipped {skipped:,} bad samples" + (f" ({summary.skips})" if skipped else ""))
    parts.append(f"checkpoints and metrics in {output_dir}")
    return "; ".join(parts) + "."
