"""A config on N GPUs: samples/s from FLOPs at a stated utilisation, bytes per step under ZeRO-1 and
ZeRO-3, the scaling efficiency they imply, memory from the dry run, and GPU-days for a number of samples.

Nothing is measured here: the work per sample is perf/throughput.py's FLOP count, the communication
perf/comm.py's count of DeepSpeed's collectives on a stated fabric, the memory perf/memory.py's
estimate. tools/scaling_table.py prints it (docs/SCALING.md).

The global batch is the config's at every N: when it no longer splits into micro-batches of the
configured size, the micro-batch shrinks to global / N (one micro-batch a step). A step's compute per
GPU is its share of the global batch times the executed FLOPs of a sample (the unmasked tail's samples
at their own cost, averaged over the run); its communication is perf/comm.py's bytes on the fabric.
Overlap: `none` adds the two, `full` hides communication behind compute up to the compute's length.
"""
from __future__ import annotations

from dataclasses import dataclass

from megapgs.config import Config
from megapgs.perf.comm import Fabric, bytes_per_gpu, feature_bytes, step_collectives
from megapgs.perf.param_count import count_params
from megapgs.perf.throughput import Keep, SampleWork, sample_work
from megapgs.train.plan import RunPlan


def at_world(cfg: Config, world_size: int) -> Config:
    """The config on `world_size` ranks: the micro-batch shrinks to global / N when it must."""
    train = cfg.train
    micro = train.micro_batch_size
    if train.global_batch_size % (micro * world_size):
        micro = train.global_batch_size // world_size
    return cfg.model_copy(update={"train": train.model_copy(update={"micro_batch_size": micro})})


def plan_for(cfg: Config, world_size: int) -> RunPlan:
    from megapgs.perf.dry_run import dry_data_plan, plan_dry

    return plan_dry(cfg, world_size, "cuda", dry_data_plan(cfg)[0])[0]


@dataclass(frozen=True)
class RunWork:
    """The FLOPs of an average sample of the run: masked steps and the unmasked tail, weighted."""
    masked: SampleWork
    unmasked: SampleWork
    tail: float

    @property
    def executed_flops(self) -> float:
        return (1 - self.tail) * self.masked.executed_flops + self.tail * self.unmasked.executed_flops

    @property
    def model_flops(self) -> float:
        return (1 - self.tail) * self.masked.model_flops + self.tail * self.unmasked.model_flops

    def samples_per_s(self, peak: float, utilisation: float) -> float:
        return peak * utilisation / self.executed_flops


def run_work(cfg: Config, plan: RunPlan, keep: Keep, caption_tokens: int, static: bool | None = None) -> RunWork:
    """The config's work per sample on `plan`'s world; `static` overrides the plan's packing."""
    kwargs = {"static": plan.static_packing if static is None else static, "batch": plan.micro_batch_size,
              "checkpointing": cfg.model.grad_checkpointing, "feature_caching": plan.feature_caching,
              "caption_tokens": caption_tokens}
    masked = cfg.pgs.masking != "none"
    return RunWork(sample_work(plan.arch, cfg.pgs, keep, masked=masked, **kwargs),
                   sample_work(plan.arch, cfg.pgs, keep, masked=False, **kwargs),
                   cfg.pgs.unmasked_tail if masked else 0.0)


@dataclass(frozen=True)
class ScalingPoint:
    world_size: int
    micro_batch: int
    accum: int
    compute_s: float               # per step, per GPU, at the stated utilisation
    comm_bytes: dict[int, float]   # ZeRO stage -> bytes each GPU sends per step
    comm_s: dict[int, float]

    def efficiency(self, stage: int, overlap: str) -> float:
        comm = self.comm_s[stage]
        step = self.compute_s + comm if overlap == "none" else max(self.compute_s, comm)
        return self.compute_s / step


def scaling_point(cfg: Config, world_size: int, keep: Keep, caption_tokens: int, peak: float,
                  utilisation: float, fabric: Fabric) -> ScalingPoint:
    cfg = at_world(cfg, world_size)
    plan = plan_for(cfg, world_size)
    work = run_work(cfg, plan, keep, caption_tokens)
    compute = cfg.train.global_batch_size / world_size * work.executed_flops / (peak * utilisation)
    counts, tensors = count_params(plan.arch, siglip=cfg.train.loss == "siglip")
    from megapgs.perf.zero_memory import ZeroSettings

    persistent = counts.persistent(tensors, ZeroSettings.from_config(cfg).param_persistence_threshold)
    features = feature_bytes(plan.global_batch_size, plan.arch.embed_dim)
    sent = {stage: bytes_per_gpu(step_collectives(stage, counts.total, persistent, plan.grad_accum_steps,
                                                  plan.feature_caching, features), world_size) for stage in (1, 3)}
    return ScalingPoint(world_size, plan.micro_batch_size, plan.grad_accum_steps, compute, sent,
                        {stage: fabric.seconds(b, world_size) for stage, b in sent.items()})


def gpu_days(samples: float, samples_per_s_per_gpu: float, efficiency: float = 1.0) -> float:
    return samples / (samples_per_s_per_gpu * efficiency) / 86400
