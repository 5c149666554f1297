"""The training loop, top to bottom:

    batch -> PGS select + pack (inside the image tower) -> forward -> loss -> backward -> step
          -> metrics every N steps -> checkpoint -> evaluation

No host sync inside a step beyond PGS's one (sizing the packed stream): losses and keep ratios
stay on the device and are reduced and fetched every `log.every_steps` steps.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megapgs.config import Config
from megapgs.data.prepare import DataPlan
from megapgs.atomic import write_json_atomic
from megapgs.dist import DistInfo
from megapgs.perf.flops import clip_forward_flops, mfu, peak_flops
from megapgs.perf.timers import StageTimer
from megapgs.pgs.keyed_random import SampleKeyedDraws
from megapgs.pgs.pack import PatchMasker
from megapgs.pgs.selection import pgs_generator
from megapgs.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from megapgs.train.engine import build_engine, set_lr
from megapgs.train.inputs import build_loader
from megapgs.train.loss import ContrastiveLoss
from megapgs.train.metrics import MetricsWriter
from megapgs.train.plan import RunPlan
from megapgs.train.progress import TrainProgress
from megapgs.train.schedule import lr_at, masking_at, progress_at
from megapgs.train.start import StartPoint

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    steps_run: int = 0
    final_step: int = 0
    samples_seen: int = 0
    seconds: float = 0.0              # the whole loop, checkpoints and evaluations included
    training_seconds: float = 0.0     # the training steps alone
    last_loss: float | None = None
    eval: dict[str, float] = field(default_factory=dict)
    skips: dict[str, int] = field(default_factory=dict)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) at every log point


def describe_eval(metrics: dict[str, float]) -> str:
    parts = []
    if "zeroshot_top1" in metrics:
        parts.append(f"zero-shot top-1 {metrics['zeroshot_top1']:.2f}% (top-5 {metrics['zeroshot_top5']:.2f}%)")
    for direction in ("image_to_text", "text_to_image"):
        if f"{direction}_R@1" in metrics:
            recalls = "/".join(f"{metrics[f'{direction}_R@{k}']:.1f}" for k in (1, 5, 10))
            parts.append(f"{direction.replace('_to_', '->')} R@1/5/10 {recalls}%")
    parts.append(f"{int(metrics['eval_samples']):,} images in {metrics['eval_seconds']:.1f} s")
    return ", ".join(parts)


class TimedMasker:
    """PatchMasker that records the PGS stage's time and its selection for the step's metrics."""

    def __init__(self, masker: PatchMasker, timer: StageTimer):
        self.masker, self.timer = masker, timer

    def __call__(self, images, cls, tokens):
        self.timer.start("pgs")
        out = self.masker(images, cls, tokens)
        self.timer.stop("pgs")
        return out

    @property
    def selection(self):
        return self.masker.selection


class Window:
    """Metrics of the steps since the last log point, kept on the device until fetched."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.keep = torch.zeros((), device=self.device)
        self.mask_checksum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.micro_batches = 0
        self.steps = 0
        self.samples = 0
        self.image_tokens = 0
        self.flops = 0.0
        self.started = time.perf_counter()

    def fetch(self, world_size: int) -> dict[str, float]:
        """Reduce over ranks and read on the host: the step's only other sync, every N steps."""
        values = torch.stack([self.loss.double(), self.keep.double()]) / max(self.micro_batches, 1)
        values = torch.cat([values / world_size, self.mask_checksum[None]])
        if world_size > 1:
            torch.distributed.all_reduce(values)
        loss, keep, checksum = values.tolist()
        return {"loss": loss, "keep_ratio": keep, "mask_checksum": checksum}

    def add_selection(self, selection) -> None:
        """Which patches were kept, as one number: equal masks give equal sums (resume checks)."""
        kept = selection.kept_idx.to(torch.float64)
        weights = torch.arange(1, kept.numel() + 1, dtype=torch.float64, device=kept.device).view_as(kept)
        self.mask_checksum += (kept * weights).sum()


def train(cfg: Config, dist: DistInfo, data: DataPlan, plan: RunPlan, start: StartPoint) -> RunSummary:
    from megapgs.data.tokenizer import Tokenizer
    from megapgs.evals.evaluate import evaluate

    run_dir = Path(cfg.train.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    config_json = cfg.model_dump_json(indent=1)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", json.loads(config_json))

    # Build in a fixed order: engine (model, optimizer, ZeRO) -> tokenizer -> loader -> loss -> resume.
    engine, _ = build_engine(cfg, plan, dist, start.init_from)
    arch, device = plan.arch, dist.device
    compute_dtype = next(engine.module.parameters()).dtype
    tokenizer = Tokenizer(cfg.model.arch)
    loader = build_loader(cfg, data, plan, dist, tokenizer)
    loss_fn = ContrastiveLoss(cfg.train.loss, cfg.train.local_loss, cfg.train.gather_with_grad,
                              dist.rank, dist.world_size)
    state = TrainState(step=0, samples_seen=0, loader=None)
    if start.resume_from is not None:
        state = load_checkpoint(engine, start.resume_from, dist)
        if state.loader is not None:
            loader.load_state_dict(state.loader)

    def run_eval(step: int) -> dict[str, float]:
        if data.eval_root is None or not (cfg.eval.zeroshot or cfg.eval.retrieval):
            return {}
        metrics = evaluate(engine.module, data.eval_root, tokenizer, image_size=arch.vision.image_size,
                           batch_size=cfg.eval.batch_size, device=device, zeroshot=cfg.eval.zeroshot,
                           retrieval=cfg.eval.retrieval, max_samples=cfg.eval.max_samples)
        writer.write(step, metrics, kind="eval")
        if dist.is_main:
            log.info("eval at step %d: %s", step, describe_eval(metrics))
        return metrics

    def checkpoint(step: int) -> None:
        save_checkpoint(engine, ckpt_dir, TrainState(step, samples_seen, loader.state_dict()), dist,
                        cfg.train.keep_last, config_json)

    writer = MetricsWriter(run_dir, cfg.log, dist.is_main)
    timer = StageTimer(device)
    peak = peak_flops(device)
    summary = RunSummary(final_step=state.step, samples_seen=state.samples_seen)
    samples_seen = state.samples_seen
    window = Window(device)
    bar = TrainProgress(plan.total_steps, state.step, enabled=dist.is_main and cfg.log.progress)
    started = time.perf_counter()
    paused_seconds = 0.0
    batches = iter(loader)
    eval_metrics: dict[str, float] = {}
    with bar:
        for step in range(state.step, plan.total_steps):
            lr = lr_at(step, cfg.optim, plan.total_steps)
            set_lr(engine, lr)
            progress = progress_at(step, plan.total_steps)
            for micro in range(plan.grad_accum_steps):
                timer.start("data")
                batch = next(batches)
                images = batch.images.to(device, compute_dtype, non_blocking=True)
                tokens = batch.tokens.to(device, non_blocking=True)
                timer.stop("data")
                keep = None
                if masking_at(step, plan.total_steps, cfg.pgs):
                    draw_step = step * plan.grad_accum_steps + micro
                    generator = (pgs_generator(cfg.train.seed, draw_step, dist.rank, device) if cfg.pgs.rng == "rank"
                                 else SampleKeyedDraws(cfg.train.seed, draw_step, dist.rank * plan.micro_batch_size))
                    keep = TimedMasker(PatchMasker(cfg.pgs, arch.vision.patch_size, progress, generator), timer)
                timer.start("forward_backward")
                out = engine(images, tokens, batch.text_lengths, keep)
                result = loss_fn(out.image, out.text, out.logit_scale, out.logit_bias)
                engine.backward(result.objective)
                timer.stop("forward_backward")
                timer.start("optimizer")
                engine.step()
                timer.stop("optimizer")
                window.loss += result.loss
                window.micro_batches += 1
                if keep is not None:
                    window.keep += keep.selection.stats["keep_ratio_mean"]
                    window.add_selection(keep.selection)
                    image_lengths = keep.selection.packed.host_lengths
                else:
                    window.keep += 1.0
                    image_lengths = [arch.vision.num_patches + 1] * images.shape[0]
                window.image_tokens += int(sum(image_lengths))
                window.flops += 3 * clip_forward_flops(arch, image_lengths, batch.text_lengths)["total"]
            window.steps += 1
            window.samples += plan.global_batch_size
            samples_seen += plan.global_batch_size
            done = step + 1
            bar.advance(done, samples_seen)

            if done % cfg.log.every_steps == 0 or done == plan.total_steps:
                metrics = window.fetch(dist.world_size)
                seconds = time.perf_counter() - window.started
                stages = timer.collect()
                metrics.update(
                    lr=lr, logit_scale=float(out.logit_scale.detach()), samples_per_s=window.samples / seconds,
                    image_tokens_per_s=window.image_tokens * dist.world_size / seconds,
                    step_ms=1e3 * seconds / window.steps, samples_seen=samples_seen,
                    **{f"{name}_ms": ms / window.steps for name, ms in stages.items()})
                if "forward_backward_ms" in metrics and "pgs_ms" in metrics:
                    metrics["forward_backward_ms"] -= metrics["pgs_ms"]  # PGS runs inside the forward
                utilisation = mfu(window.flops / window.steps * dist.world_size, seconds / window.steps, peak,
                                  dist.world_size)
                if utilisation is not None:
                    metrics["mfu"] = utilisation
                metrics.update({f"skipped_{reason}": count for reason, count in loader.skips.all_reduced().nonzero().items()})
                writer.write(done, metrics)
                bar.show(metrics)
                summary.losses.append((done, metrics["loss"]))
                summary.last_loss = metrics["loss"]
                window.reset()

            paused = time.perf_counter()  # checkpoints and evaluations do not count as training time
            if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and done != plan.total_steps:
                checkpoint(done)
            if cfg.eval.every_steps and done % cfg.eval.every_steps == 0 and done != plan.total_steps:
                eval_metrics = run_eval(done)
            pause = time.perf_counter() - paused
            window.started += pause
            paused_seconds += pause
            summary.steps_run += 1
            summary.final_step = done

    summary.training_seconds = time.perf_counter() - started - paused_seconds
    if summary.steps_run:
        checkpoint(summary.final_step)
    eval_metrics = run_eval(summary.final_step) or eval_metrics
    summary.seconds = time.perf_counter() - started
    summary.samples_seen = samples_seen
    summary.eval = eval_metrics
    summary.skips = loader.skips.all_reduced().nonzero()
    writer.close()
    return summary
