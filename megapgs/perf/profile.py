"""Throughput of the real training step, and of OpenCLIP's model of the same architecture on the same
inputs, in one process: what tools/profile_throughput.py prints.

megapgs's step is the training loop's own (`TrainStep`: the DeepSpeed engine, PGS or random masking,
packed towers, the contrastive loss, backward, the optimizer), timed per stage with `StageTimer`
(CUDA events on a GPU, the wall clock on the CPU) and per step with a device sync at each end. The
OpenCLIP step is OpenCLIP's model (`open_clip.create_model` of the same towers), its `ClipLoss`,
fused AdamW and, for masking, its `PatchDropout` (FLIP), eager or under torch.compile.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from megapgs.config import Config
from megapgs.data.wds import Batch
from megapgs.dist import DistInfo
from megapgs.models.archs import ArchSpec
from megapgs.perf.flops import clip_forward_flops_from_sums
from megapgs.perf.timers import StageTimer
from megapgs.train.inputs import to_device

# Short photo captions of the lengths people write (6 to 16 tokens with SOT and EOT).
CAPTIONS = (
    "an astronaut in a white suit beside the american flag", "a tabby cat lying on a blanket",
    "a cup of coffee on a saucer", "a rocket on its launch pad at dusk", "cells under a microscope",
    "portrait of a smiling woman in a space suit", "a ginger cat looking at the camera",
    "latte art in a white cup on a wooden table", "the space shuttle ready for launch",
    "stained tissue sample, pink and purple",
)


@dataclass
class Timing:
    """One variant's figures: medians over the measured steps."""
    name: str
    batch: int
    step_ms: float
    kept_share: float              # image patches computed per patch of the image
    image_tokens: float            # image tokens computed per step (CLS included, padding not)
    flops: float                   # model FLOPs per step of the tokens computed (forward + backward)
    peak_memory_gib: float | None
    stages_ms: dict[str, float] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.batch / self.step_ms * 1e3

    @property
    def image_tokens_per_s(self) -> float:
        return self.image_tokens / self.step_ms * 1e3

    def mfu(self, peak: float | None) -> float | None:
        return None if peak is None else self.flops / (self.step_ms / 1e3) / peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _median_stages(per_step: list[dict[str, float]]) -> dict[str, float]:
    names = sorted({name for stages in per_step for name in stages})
    return {name: statistics.median(stages.get(name, 0.0) for stages in per_step) for name in names}


# ----------------------------------------------------------------------------- configs and inputs

class ProfileConfigs:
    """The run config of a profile, and its variants: one optimizer step per call at `batch` images
    (default: the config's micro-batch), masked throughout (no unmasked tail), no evaluation, nothing
    written but into a temporary folder. `configs(*extra)` adds `--set`-style overrides."""

    def __init__(self, path: str | None, overrides: list[str], batch: int | None):
        import tempfile

        from megapgs.config import load_config

        self.path, self.overrides = path, list(overrides)
        self.batch = batch or load_config(path, self.overrides).train.micro_batch_size
        self.forced = [f"train.micro_batch_size={self.batch}", f"train.global_batch_size={self.batch}",
                       "train.steps=1000000", "train.epochs=null", "pgs.unmasked_tail=0", "eval.zeroshot=false",
                       "eval.retrieval=false", "log.tensorboard=false", "log.progress=false",
                       f"train.output_dir={tempfile.mkdtemp(prefix='megapgs-profile-')}"]

    def __call__(self, *extra: str) -> Config:
        from megapgs.config import load_config

        return load_config(self.path, [*self.overrides, *self.forced, *extra])

    def random_keeping(self, share: float) -> Config:
        """Random masking (FLIP) that keeps `share` of the patches: the implementation at a token count."""
        min_keep = min(share, self().pgs.min_keep_ratio)
        return self("pgs.masking=random", f"pgs.min_mask_ratio={1 - share:.6f}", f"pgs.min_keep_ratio={min_keep:.6f}")


def start_profile(config: str | None, overrides: list[str], batch: int | None, tool: str) -> tuple[DistInfo, ProfileConfigs]:
    """One process on one device and the profile's configs, or exit 2 with the reason (a tool's start)."""
    import sys

    from megapgs.config import ConfigError
    from megapgs.dist import init_distributed

    dist = init_distributed()
    if dist.world_size > 1:
        print(f"error: {tool} times one device; run it without a multi-rank launcher", file=sys.stderr)
        raise SystemExit(2)
    try:
        configs = ProfileConfigs(config, overrides, batch)
        configs()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return dist, configs


def profile_batches(kind: str, cfg: Config, dist: DistInfo, batch: int) -> Iterator[Batch]:
    """Endless batches for a profile: `photos` (scikit-image's, short real captions), `synthetic`
    (random tensors made on the device) or `shards` (the configured loader, DALI on a GPU)."""
    from megapgs.data.tokenizer import Tokenizer
    from megapgs.models.archs import get_arch

    spec = get_arch(cfg.model.arch)
    if kind == "photos":
        return photo_batches(spec, batch, Tokenizer(cfg.model.arch), dist.device)
    if kind == "synthetic":
        from megapgs.data.synthetic import build_synthetic_loader

        return iter(build_synthetic_loader(batch_size=batch, image_size=spec.vision.image_size,
                                           context_length=spec.text.context_length, device=dist.device))
    if kind != "shards":
        raise ValueError(f"unknown profile data {kind!r}; allowed: photos, synthetic, shards")
    from megapgs.data.prepare import prepare_data
    from megapgs.train.inputs import build_loader
    from megapgs.train.plan import plan_run

    data = prepare_data(cfg, dist)
    return iter(build_loader(cfg, data, plan_run(cfg, dist, data), dist, Tokenizer(cfg.model.arch)))


def photo_batches(spec: ArchSpec, batch: int, tokenizer, device: torch.device) -> Iterator[Batch]:
    """scikit-image's photos tiled to the batch (every other one mirrored) with short real captions:
    PGS keeps on them what it keeps on photos. The same batch every step (masks are drawn anew)."""
    from megapgs.data.photos import PHOTOS, photo_batch

    photos = photo_batch(spec.vision.image_size)
    images = photos.repeat((batch + len(PHOTOS) - 1) // len(PHOTOS), 1, 1, 1)[:batch]
    images = torch.where((torch.arange(batch) % 2 == 1).view(-1, 1, 1, 1), images.flip(3), images)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    tokens, lengths = tokenizer(captions)
    fixed = Batch(images=images.to(device), tokens=tokens.to(device), text_lengths=lengths,
                  keys=[f"photo-{i}" for i in range(batch)], epochs=[0] * batch)
    while True:
        yield fixed


# ----------------------------------------------------------------------------- megapgs

def profile_megapgs(cfg: Config, dist: DistInfo, batches: Iterator[Batch], name: str, steps: int, warmup: int,
                    progress: float, trace_dir: Path | None = None) -> Timing:
    """Time `steps` optimizer steps of the training loop's step under `cfg` (one rank, no accumulation
    beyond the config's), after `warmup` untimed ones."""
    from megapgs.data.prepare import DataPlan
    from megapgs.train.engine import build_engine, set_lr
    from megapgs.train.loss import ContrastiveLoss
    from megapgs.train.plan import plan_run
    from megapgs.train.step import MicroBatch, TrainStep, pgs_masker

    device = dist.device
    _reset_memory(device)
    plan = plan_run(cfg, dist, DataPlan((), None, None, None))
    engine, model = build_engine(cfg, plan, dist)
    set_lr(engine, cfg.optim.lr)
    loss_fn = ContrastiveLoss(cfg.train.loss, cfg.train.local_loss, cfg.train.gather_with_grad, dist)
    timer = StageTimer(device)
    train_step = TrainStep(engine, loss_fn, plan.feature_caching, timer)
    compute_dtype = next(model.parameters()).dtype
    for tower, stage in ((model.visual, "image_tower"), (model.text, "text_tower")):
        tower.register_forward_pre_hook(lambda *_, stage=stage: timer.start(stage))
        tower.register_forward_hook(lambda *_, stage=stage: timer.stop(stage))
    L = plan.arch.vision.num_patches
    step_times, stage_times, kept, tokens, text_tokens = [], [], [], [], []
    tracer = contextlib.nullcontext()
    for i in range(warmup + steps):
        if i == warmup and trace_dir is not None:
            tracer = _tracer(trace_dir, device)
            tracer.__enter__()
        taken: list[MicroBatch] = []

        def micro_batches():
            for micro in range(plan.grad_accum_steps):
                timer.start("data")
                batch = next(batches)
                images, tokens_BC = to_device(batch.images, device, compute_dtype), to_device(batch.tokens, device)
                timer.stop("data")
                keep = pgs_masker(cfg, plan, dist, i, micro, progress, timer) if cfg.pgs.masking != "none" else None
                taken.append(MicroBatch(images, tokens_BC, batch.text_lengths, keep))
                yield taken[-1]

        _sync(device)
        started = time.perf_counter()
        train_step(micro_batches())
        _sync(device)
        seconds = time.perf_counter() - started
        stages = timer.collect()
        if i < warmup:
            continue
        step_times.append(seconds * 1e3)
        stage_times.append(_tower_stages_without_pgs(stages))
        counts = [mb.keep.selection.counts for mb in taken if mb.keep is not None]
        kept_patches = sum(int(c.sum()) for c in counts) if counts else L * len(taken) * plan.micro_batch_size
        images = len(taken) * plan.micro_batch_size
        kept.append(kept_patches / (images * L))
        tokens.append((kept_patches + images, sum(int((c + 1).square().sum()) for c in counts)
                       if counts else images * (L + 1) ** 2))
        text_tokens.append([n for mb in taken for n in mb.text_lengths])
    if trace_dir is not None:
        tracer.__exit__(None, None, None)
    image_tokens, image_sq = (statistics.median(t[k] for t in tokens) for k in (0, 1))
    texts = statistics.median_low([sum(lengths) for lengths in text_tokens])
    text_sq = statistics.median_low([sum(n * n for n in lengths) for lengths in text_tokens])
    images = plan.grad_accum_steps * plan.micro_batch_size
    flops = 3 * clip_forward_flops_from_sums(plan.arch, images, int(image_tokens), int(image_sq), images,
                                             texts, text_sq)["total"]
    timing = Timing(name, images, statistics.median(step_times), statistics.median(kept), image_tokens, flops,
                    _peak_memory(device), _median_stages(stage_times))
    del engine, model, train_step
    _reset_memory(device)
    return timing


def _tower_stages_without_pgs(stages: dict[str, float]) -> dict[str, float]:
    """The image tower's stage runs PGS inside it; report the two apart. Forward = both towers."""
    stages = dict(stages)
    if "pgs" in stages and "image_tower" in stages:
        stages["image_tower"] -= stages["pgs"]
    return stages


def _tracer(trace_dir: Path, device: torch.device):
    trace_dir.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities, record_shapes=False,
                                  on_trace_ready=torch.profiler.tensorboard_trace_handler(str(trace_dir)))


# ----------------------------------------------------------------------------- OpenCLIP

def profile_openclip(spec: ArchSpec, batch: Batch, name: str, drop: float, compiled: bool, steps: int,
                     warmup: int, device: torch.device, bf16: bool, grad_checkpointing: bool = False,
                     clip_norm: float = 0.0) -> Timing:
    """Time OpenCLIP's training step (model, ClipLoss, fused AdamW; `PatchDropout(drop)` when drop > 0)
    on this batch, eager or compiled, with the run's recipe: activation checkpointing and gradient
    clipping as the megapgs config has them."""
    import open_clip
    from open_clip.transformer import PatchDropout

    from megapgs.convert.openclip import build_openclip_model

    _reset_memory(device)
    torch.manual_seed(0)
    model = build_openclip_model(spec).to(device).train()
    model.set_grad_checkpointing(grad_checkpointing)
    if drop > 0:
        model.visual.patch_dropout = PatchDropout(drop)
    loss_fn = open_clip.loss.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward: Callable = torch.compile(model) if compiled else model
    images, tokens = batch.images.to(device), batch.tokens.to(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())
    timer = StageTimer(device)
    step_times, stage_times = [], []
    for i in range(warmup + steps):
        _sync(device)
        started = time.perf_counter()
        timer.start("forward")
        with autocast:
            image_features, text_features, scale = forward(images, tokens)[:3]
            timer.stop("forward")
            timer.start("loss")
            loss = loss_fn(image_features, text_features, scale)
            timer.stop("loss")
        timer.start("backward")
        loss.backward()
        timer.stop("backward")
        timer.start("optimizer")
        if clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.stop("optimizer")
        _sync(device)
        seconds = time.perf_counter() - started
        stages = timer.collect()
        if i >= warmup:
            step_times.append(seconds * 1e3)
            stage_times.append(stages)
    B, L, C = images.shape[0], spec.vision.num_patches, tokens.shape[1]
    kept = max(1, int(L * (1 - drop))) if drop > 0 else L  # PatchDropout's own count
    flops = 3 * clip_forward_flops_from_sums(spec, B, B * (kept + 1), B * (kept + 1) ** 2, B, B * C,
                                             B * C * C)["total"]  # OpenCLIP runs every text position
    timing = Timing(name, B, statistics.median(step_times), kept / L, B * (kept + 1), flops, _peak_memory(device),
                    _median_stages(stage_times))
    del model, optimizer, forward
    _reset_memory(device)
    return timing

