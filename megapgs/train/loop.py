"""The training loop, top to bottom:

    micro-batches -> PGS select + pack (inside the image tower) -> forward -> loss -> backward
          -> engine.step (train/step.py) -> metrics every N steps -> checkpoint -> evaluation

No host sync inside a step (with `pgs.packed_length: static`, the default on CUDA): losses, keep
ratios and token counts stay on the device (train/window.py) and are reduced and fetched every
`log.every_steps` steps, with the loader's skip counts, in one collective.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path


from megapgs.config import Config
from megapgs.data.prepare import DataPlan
from megapgs.atomic import write_json_atomic
from megapgs.dist import DistInfo
from megapgs.perf.flops import peak_flops
from megapgs.perf.timers import StageTimer
from megapgs.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from megapgs.train.engine import build_engine, set_lr
from megapgs.train.inputs import build_loader, to_device
from megapgs.train.loss import ContrastiveLoss
from megapgs.train.metrics import MetricsWriter
from megapgs.train.plan import RunPlan
from megapgs.train.preempt import StopRequest
from megapgs.train.progress import TrainProgress
from megapgs.train.reshard import needs_universal
from megapgs.train.schedule import lr_at, masking_at, progress_at
from megapgs.train.step import MicroBatch, TrainStep, pgs_masker
from megapgs.train.window import Window
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
    stopped_by: str | None = None     # the signal that stopped the run early (its checkpoint written)


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
    universal = start.resume_from is not None and needs_universal(start.resume_from, dist.world_size)
    engine, _ = build_engine(cfg, plan, dist, start.init_from, load_universal=universal)
    arch, device = plan.arch, dist.device
    compute_dtype = next(engine.module.parameters()).dtype
    tokenizer = Tokenizer(cfg.model.arch)
    loader = build_loader(cfg, data, plan, dist, tokenizer)
    loss_fn = ContrastiveLoss(cfg.train.loss, cfg.train.local_loss, cfg.train.gather_with_grad, dist)
    state = TrainState(step=0, samples_seen=0, loader=None)
    if start.resume_from is not None:
        state = load_checkpoint(engine, start.resume_from, dist)
        if state.loader is not None:
            loader.load_state_dict(state.loader)
        elif state.other_world_loaders is not None:  # saved by another number of ranks
            loader.load_other_world_states(state.other_world_loaders, state.samples_seen)

    def run_eval(step: int) -> dict[str, float]:
        if data.eval_root is None or not (cfg.eval.zeroshot or cfg.eval.retrieval):
            return {}
        metrics = evaluate(engine.module, data.eval_root, tokenizer, image_size=arch.vision.image_size,
                           batch_size=cfg.eval.batch_size, device=device, zeroshot=cfg.eval.zeroshot,
                           retrieval=cfg.eval.retrieval, max_samples=cfg.eval.max_samples, dist=dist,
                           workers=cfg.eval.workers)
        writer.write(step, metrics, kind="eval")
        if dist.is_main:
            log.info("eval at step %d: %s", step, describe_eval(metrics))
        return metrics

    saved_at = state.step  # the step of the newest checkpoint (a resumed run's is the one it read)

    def checkpoint(step: int) -> None:
        nonlocal saved_at
        if step != saved_at:
            save_checkpoint(engine, ckpt_dir, TrainState(step, samples_seen, loader.state_dict()), dist,
                            cfg.train.keep_last, config_json)
            saved_at = step

    writer = MetricsWriter(run_dir, cfg.log, dist.is_main)
    timer = StageTimer(device)
    peak = peak_flops(device)
    train_step = TrainStep(engine, loss_fn, plan.feature_caching, timer)
    summary = RunSummary(final_step=state.step, samples_seen=state.samples_seen)
    samples_seen = state.samples_seen
    window = Window(device, arch)
    bar = TrainProgress(plan.total_steps, state.step, enabled=dist.is_main and cfg.log.progress)
    started = time.perf_counter()
    paused_seconds = 0.0
    batches = iter(loader)
    eval_metrics: dict[str, float] = {}

    def micro_batches(step: int, progress: float, taken: list[MicroBatch]):
        """The step's micro-batches, each loaded when it is asked for, with its PGS masker."""
        masked = masking_at(step, plan.total_steps, cfg.pgs)
        for micro in range(plan.grad_accum_steps):
            timer.start("data")
            batch = next(batches)
            images = to_device(batch.images, device, compute_dtype)
            tokens = to_device(batch.tokens, device)
            timer.stop("data")
            keep = pgs_masker(cfg, plan, dist, step, micro, progress, timer) if masked else None
            taken.append(MicroBatch(images, tokens, batch.text_lengths, keep, tuple(batch.keys)))
            yield taken[-1]

    def log_window(done: int) -> None:
        metrics = window.fetch(dist, loader.skips, peak)  # the loop's one sync, every N steps
        stages = {f"{name}_ms": ms / window.steps for name, ms in timer.collect().items()}
        if "pgs_ms" in stages:  # PGS runs inside the first forward of each micro-batch
            first_pass = "feature_cache_ms" if "feature_cache_ms" in stages else "forward_ms"
            stages[first_pass] -= stages["pgs_ms"]
        metrics.update(lr=lr, samples_seen=samples_seen, **stages)
        writer.write(done, metrics)
        bar.show(metrics)
        summary.losses.append((done, metrics["loss"]))
        summary.last_loss = metrics["loss"]
        window.reset()

    with bar, StopRequest() as stop:
        for step in range(state.step, plan.total_steps):
            lr = lr_at(step, cfg.optim, plan.total_steps)
            set_lr(engine, lr)
            taken: list[MicroBatch] = []
            out = train_step(micro_batches(step, progress_at(step, plan.total_steps), taken))
            for mb in taken:  # after the step: each masker holds the selection its forward drew
                window.add_micro_batch(mb.keep.selection if mb.keep is not None else None, mb.images.shape[0],
                                       mb.text_lengths, mb.keys)
            window.add_step(out.loss, out.logit_scale, plan.global_batch_size)
            samples_seen += plan.global_batch_size
            done = step + 1
            bar.advance(done, samples_seen)

            if done % cfg.log.every_steps == 0 or done == plan.total_steps:
                log_window(done)

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
            if done < plan.total_steps and stop.agreed(dist):  # a signal on any rank: all stop here
                if window.steps:
                    log_window(done)
                summary.stopped_by = stop.name
                if dist.is_main:
                    log.warning("stopping at step %d on %s: writing a checkpoint; continue with --resume auto",
                                done, stop.name)
                break

    summary.training_seconds = time.perf_counter() - started - paused_seconds
    if summary.steps_run:
        checkpoint(summary.final_step)
    if summary.stopped_by is None:  # a stopped run has its time limit close: no evaluation
        eval_metrics = run_eval(summary.final_step) or eval_metrics
    summary.seconds = time.perf_counter() - started
    summary.samples_seen = samples_seen
    summary.eval = eval_metrics
    summary.skips = loader.skips.all_reduced(dist).nonzero()
    writer.close()
    return summary
