"""`pretrain.py --dry-run`: what a run would be and how much memory each rank would need, without running it.

    python launch/pretrain.py --config configs/vitl_pgs03.json --dry-run --world-size 64
    python -m megapgs.perf.dry_run --config configs/vith_pgs03.json --world-size 8 --device-memory-gib 79.6

Resolves the config, the ranks (`--world-size`, else the launcher's WORLD_SIZE, else 1) and the
data as far as the manifest's listing (never a shard; an unreadable manifest makes the shard count
"unknown"), plans the run as `train/plan.py` does, and prints the run's header table, then the
world, shards per rank, ZeRO settings and parameter counts, then the memory estimate per rank
(megapgs/perf/memory.py): each term, each phase of a step, the peak, and the peak with activation
checkpointing switched the other way. Builds no model, starts no DeepSpeed engine, joins no process
group: it runs on a laptop for a 64-GPU config. The device predicted for is `--device`, else CUDA
when the config trains in bf16/fp16 or this machine has a GPU, else the CPU.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from rich.console import Console
from rich.table import Table

from megapgs import exit_codes
from megapgs.config import Config, ConfigError, load_config
from megapgs.data.faults import DataError
from megapgs.data.prepare import DataPlan, resolve_shard_set
from megapgs.data.shards import MANIFEST
from megapgs.dist import DistInfo
from megapgs.perf.memory import MemoryEstimate, estimate_memory
from megapgs.perf.zero_memory import ZeroSettings
from megapgs.perf.param_count import count_params
from megapgs.train.plan import RunPlan, plan_run

GIB = 2**30
DEFAULT_GPU_GIB = 79.6  # an "80 GB" H100 reports 81 559 MiB to nvidia-smi (an A100 80GB: 81 920 MiB)


def dry_data_plan(cfg: Config) -> tuple[DataPlan, str | None]:
    """The data as far as resolving the config needs: the manifest's listing when it is readable
    (one stat per local shard, no shard read), nothing else. Returns the plan and, when the shards
    could not be listed, why."""
    if cfg.data.source == "synthetic":
        return DataPlan((), cfg.data.samples_per_epoch, None, None), None
    spec = (str(Path(cfg.data.root) / "fashion_mnist" / "train" / MANIFEST) if cfg.data.source == "fashion_mnist"
            else cfg.data.train_shards or "")
    try:
        urls, samples, index = resolve_shard_set(spec, "data.train_shards")
    except (DataError, OSError) as err:
        return DataPlan((), cfg.data.samples_per_epoch, None, None), f"{spec} cannot be listed here ({err})"
    if cfg.data.samples_per_epoch is not None:
        samples = cfg.data.samples_per_epoch
    return DataPlan(urls, samples, None, None, index), None


def resolve_world(world_size: int | None) -> int:
    if world_size is not None:
        if world_size < 1:
            raise ConfigError(f"--world-size must be at least 1 (got {world_size})")
        return world_size
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(1, int(value))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={value!r} is not an integer") from None


def predicted_device(cfg: Config, device: str | None) -> str:
    if device is not None:
        return device
    return "cuda" if cfg.precision != "fp32" or torch.cuda.is_available() else "cpu"


def plan_dry(cfg: Config, world_size: int, device: str, data: DataPlan) -> tuple[RunPlan, bool]:
    """(the plan, whether its step count is known). An epoch-based run whose epoch size is unknown
    here is planned with a stand-in step count: nothing in the memory estimate depends on it."""
    dist = DistInfo(rank=0, world_size=world_size, local_rank=0, device=torch.device(device))
    if cfg.train.epochs is not None and not data.train_samples:
        stand_in = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 1, "epochs": None})})
        return plan_run(stand_in, dist, data), False
    return plan_run(cfg, dist, data), True


def estimate_for(cfg: Config, world_size: int, device: str) -> MemoryEstimate:
    """The estimate of `cfg` on `world_size` ranks of `device`, data resolved as the dry run does."""
    data, _ = dry_data_plan(cfg)
    plan, _ = plan_dry(cfg, world_size, device, data)
    return estimate_memory(cfg, plan, device)


def shards_per_rank(cfg: Config, data: DataPlan, world_size: int, unreadable: str | None) -> str:
    if cfg.data.source == "synthetic":
        return "none (synthetic data)"
    if unreadable:
        return f"unknown: {unreadable}"
    n = len(data.train_urls)
    if cfg.data.resampled:
        return f"resampled: each rank draws windows of {cfg.data.dali_window_shards} from all {n:,} shards"
    low, high = n // world_size, math.ceil(n / world_size)
    text = f"{low:,}" if low == high else f"{low:,} or {high:,}"
    text += f" of {n:,} shards"
    if n < world_size:
        text += " (fewer shards than ranks: write smaller shards or set data.resampled)"
    return text


def gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:,.0f} MiB"


def run_table(cfg: Config, plan: RunPlan, data: DataPlan, device: str, schedule_known: bool,
              shards: str) -> Table:
    """entry.plan_table's rows (the schedule "unknown" when the epoch size is), then the dry run's own."""
    from megapgs.entry import plan_table

    header = plan_table(cfg, plan, data.describe() if data.train_urls or cfg.data.source == "synthetic"
                        else "shards not listed here")
    table = Table(title="megapgs dry run", show_header=False, title_justify="left")
    names, values = (list(column.cells) for column in header.columns)
    for name, value in zip(names, values):
        if name == "schedule" and not schedule_known:
            value = (f"{cfg.train.epochs:g} epochs of an epoch size unknown here (give a readable manifest or "
                     f"data.samples_per_epoch), lr {cfg.optim.lr:g} ({cfg.optim.schedule}, "
                     f"{cfg.optim.warmup_steps} warmup)")
        table.add_row(name, value)
    counts, _ = count_params(plan.arch, siglip=cfg.train.loss == "siglip")
    table.add_row("world", f"{plan.world_size} ranks on {device} (predicted for)")
    table.add_row("per rank", f"micro batch {plan.micro_batch_size}, {plan.grad_accum_steps} accumulation steps, "
                              f"global batch {plan.global_batch_size:,}")
    table.add_row("shards per rank", shards)
    table.add_row("ZeRO", ZeroSettings.from_config(cfg).describe())
    table.add_row("parameters", f"{counts.total:,} (vision {counts.vision:,}, text {counts.text:,}, logit scale"
                                f"{' and bias' if cfg.train.loss == 'siglip' else ''}); largest block "
                                f"{counts.largest_block:,}")
    theirs = deepspeed_states_estimate(cfg.zero_stage, counts.total, counts.largest_block, plan.world_size)
    if theirs is not None:
        table.add_row("DeepSpeed's estimate", f"{gib(theirs)} of model states per GPU (its estimate_zero"
                      f"{3 if cfg.zero_stage == 3 else 2}_model_states_mem_needs, no offload, 16-bit parameters)")
    return table


def deepspeed_states_estimate(stage: int, params: int, largest_block: int, world_size: int) -> int | None:
    """DeepSpeed's own arithmetic for the model states per GPU under ZeRO 1-3 (none for stage 0),
    to read beside ours: its factors assume 16-bit parameters and count no buckets or activations."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return estimate_zero3_model_states_mem_needs(params, largest_block, world_size, 1, cpu_offload=False)[1]
    if stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(params, world_size, 1, cpu_offload=False)[1]
    return None


def memory_tables(estimate: MemoryEstimate, device_memory: float | None) -> tuple[Table, Table]:
    terms = Table(title=f"memory per rank ({estimate.device})", title_justify="left")
    terms.add_column("term")
    terms.add_column("size", justify="right")
    terms.add_column("what")
    for term in estimate.terms.values():
        terms.add_row(term.name, gib(term.bytes), term.note)
    rule = ("the peak is the largest" if estimate.device != "cpu" else
            "the peak: what lives all along + the largest heap use + the largest mapped transients")
    phases = Table(title=f"phases of a step ({rule})", title_justify="left")
    phases.add_column("phase")
    phases.add_column("total", justify="right")
    phases.add_column("terms")
    for name, parts in estimate.phases.items():
        marker = " (peak)" if name == estimate.peak_phase else ""
        phases.add_row(name + marker, gib(estimate.phase_bytes(name)), ", ".join(parts))
    if estimate.device == "cpu" and estimate.peak_phase not in estimate.phases:
        phases.add_row("peak (the CPU's allocator)", gib(estimate.peak_bytes),
                       f"{estimate.peak_phase}: freed heap memory stays resident (memory.MemoryEstimate)")
    other = "off" if estimate.checkpointing else "on"
    phases.add_row(f"peak with checkpointing {other}", gib(estimate.peak_with_other_checkpointing()),
                   f"activations {gib(estimate.other_activations)} instead of "
                   f"{gib(estimate.terms['activations'].bytes)}")
    if device_memory:
        spare = device_memory * GIB - estimate.peak_bytes
        verdict = (f"fits: {gib(spare)} to spare" if spare >= 0 else f"does not fit: {gib(-spare)} over")
        phases.add_row(f"on a {device_memory:g} GiB device", verdict, "")
    return terms, phases


def dry_run(cfg: Config, world_size: int | None = None, device: str | None = None,
            device_memory_gib: float | None = None, out: Console | None = None) -> int:
    """Print the dry run of `cfg`; its exit code."""
    out = out or Console(width=None if sys.stdout.isatty() else 160)
    try:
        world = resolve_world(world_size)
        device = predicted_device(cfg, device)
        data, unreadable = dry_data_plan(cfg)
        plan, schedule_known = plan_dry(cfg, world, device, data)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    estimate = estimate_memory(cfg, plan, device)
    if device_memory_gib is None and device == "cuda":
        device_memory_gib = (torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available()
                             else DEFAULT_GPU_GIB)
    out.print(run_table(cfg, plan, data, device, schedule_known, shards_per_rank(cfg, data, world, unreadable)))
    for table in memory_tables(estimate, device_memory_gib):
        out.print(table)
    out.print(f"peak per rank: {gib(estimate.peak_bytes)} ({estimate.peak_phase})")
    for note in estimate.notes:
        out.print(f"note: {note}")
    return exit_codes.OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megapgs.perf.dry_run", description=__doc__.splitlines()[0])
    parser.add_argument("--config", metavar="PATH")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--world-size", type=int, help="ranks (default: WORLD_SIZE, else 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="the device predicted for")
    parser.add_argument("--device-memory-gib", type=float, help=f"device memory to compare the peak with "
                        f"(default on CUDA: this GPU's, else {DEFAULT_GPU_GIB})")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    return dry_run(cfg, args.world_size, args.device, args.device_memory_gib)


if __name__ == "__main__":
    sys.exit(main())
