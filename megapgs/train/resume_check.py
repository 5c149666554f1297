"""What a resume may change: the saved run's config (in the checkpoint's COMPLETE marker) against
this run's, checked before anything heavy starts.

Refused (`REFUSED`): what the checkpoint cannot load, or what loading it would silently undo.

    model.arch (its towers)            the weights have other shapes
    train.loss                         CLIP and SigLIP models hold different parameters (logit_bias)
    ZeRO stage                         DeepSpeed writes each stage's optimizer state in its own layout
    precision (bf16 / fp16 / fp32)     the optimizer state (fp32 master weights, loss scaler) differs
    optim.betas, optim.eps,            the optimizer state carries them: loading it would put the saved
      optim.weight_decay                 values back without a word
    data.source, data.loader           the saved data position belongs to another loader
    train.steps below the              the run would train nothing and end past train.steps
      checkpoint's step

Accepted, everything else; the run logs each change it takes:

    train.steps / train.epochs         longer or shorter runs; the lr schedule is recomputed for the new length
    optim.lr, schedule, warmup_steps,  the lr is computed from the config at every step
      min_lr_ratio
    pgs.*                              masks from the resume point on follow the new settings
    model.attention, grad_checkpointing, compile     the same weights, computed another way
    train.global_batch_size, micro_batch_size, seed, checkpoint_every, keep_last
    data.* (other keys)                a loader whose shards, workers or shuffle changed starts its next epoch
    eval.*, log.*, deepspeed.* (other keys, e.g. gradient_clipping)

A run on another number of ranks continues through DeepSpeed's Universal Checkpointing
(megapgs/train/reshard.py).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from megapgs.config import Config
from megapgs.train.checkpoint import COMPLETE

log = logging.getLogger(__name__)

REFUSED: dict[str, str] = {
    "model.arch": "the weights of other towers have other shapes",
    "train.loss": "CLIP and SigLIP models hold different parameters (SigLIP's logit_bias)",
    "zero stage": "DeepSpeed writes the optimizer state of each ZeRO stage in its own layout",
    "precision": "the optimizer state of bf16, fp16 and fp32 runs differs (fp32 master weights, loss scaler)",
    "optim.betas": "the optimizer state carries it: the saved value would come back silently",
    "optim.eps": "the optimizer state carries it: the saved value would come back silently",
    "optim.weight_decay": "the optimizer state carries it: the saved value would come back silently",
    "data.source": "the saved data position belongs to another loader",
    "data.loader": "the saved data position belongs to another loader",
}
ACCEPTED_SUMMARY = ("train.steps/epochs, optim.lr/schedule/warmup_steps/min_lr_ratio, pgs.*, model.attention/"
                    "grad_checkpointing/compile, batch sizes, seed, checkpointing, other data.* keys, eval.*, log.*, "
                    "other deepspeed.* keys")


class ResumeRefused(ValueError):
    """The checkpoint's run differs from this one in what a resume cannot change."""


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key != "deepspeed":
            out.update(_flat(value, f"{path}."))
        else:
            out[path] = value
    return out


def _zero_stage(ds: dict[str, Any]) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def _precision(ds: dict[str, Any]) -> str:
    return next((name for name in ("bf16", "fp16") if (ds.get(name) or {}).get("enabled")), "fp32")


def _ds_rest(ds: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed JSON without what is compared on its own (stage, precision)."""
    rest = {k: v for k, v in ds.items() if k not in ("bf16", "fp16")}
    zero = {k: v for k, v in (rest.pop("zero_optimization", None) or {}).items() if k != "stage"}
    return {**rest, **({"zero_optimization": zero} if zero else {})}


def _tower_difference(saved: str, now: str) -> str | None:
    """None when the two model.arch values name the same towers (a name and its JSON file, say),
    else what differs."""
    if saved == now:
        return None
    from megapgs.models.archs import ArchError, get_arch

    try:
        have, want = get_arch(saved).numbers(), get_arch(now).numbers()
    except ArchError:  # a saved arch this version cannot resolve: compare the names
        return "another architecture"
    if have == want:
        return None
    return ", ".join(f"{key} {have.get(key)} vs {want[key]}" for key in want if have.get(key) != want[key])


def compare_configs(saved: dict[str, Any], now: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, accepted): one line per changed setting, `key: saved -> now`, refused ones with why."""
    refused: list[str] = []
    accepted: list[str] = []

    def changed(key: str, old: Any, new: Any, why: str | None = None) -> None:
        line = f"{key}: {json.dumps(old)} (saved) -> {json.dumps(new)} (now)"
        if why is not None:
            refused.append(f"{line}: {why}")
        else:
            accepted.append(line)

    old_ds, new_ds = saved.get("deepspeed") or {}, now.get("deepspeed") or {}
    derived: dict[str, Callable[[dict[str, Any]], Any]] = {"zero stage": _zero_stage, "precision": _precision}
    for key, read in derived.items():
        if read(old_ds) != read(new_ds):
            changed(key, read(old_ds), read(new_ds), REFUSED[key])
    old_flat, new_flat = _flat(saved), _flat(now)
    old_flat["deepspeed"], new_flat["deepspeed"] = _ds_rest(old_ds), _ds_rest(new_ds)
    for key in sorted(set(old_flat) | set(new_flat)):
        old, new = old_flat.get(key), new_flat.get(key)
        if old == new or key in ("train.resume", "train.output_dir"):
            continue
        if key not in old_flat or key not in new_flat:  # a setting one of the two versions does not have
            changed(key, old, new)
        elif key == "model.arch":
            difference = _tower_difference(old, new)
            if difference is not None:
                changed(key, old, new, f"{REFUSED[key]} ({difference})")
        else:
            changed(key, old, new, REFUSED.get(key))
    return refused, accepted


def check_resume(cfg: Config, checkpoint: Path) -> list[str]:
    """The accepted changes against the checkpoint's run, or ResumeRefused naming every refused one
    and the ways out."""
    marker = json.loads((checkpoint / COMPLETE).read_text())
    saved = marker.get("config")
    if not isinstance(saved, dict):
        log.warning("checkpoint %s does not record its run's config: resuming without comparing settings", checkpoint)
        return []
    refused, accepted = compare_configs(saved, json.loads(cfg.model_dump_json()))
    step = int(marker.get("step", 0))
    if cfg.train.steps is not None and cfg.train.steps < step:
        refused.append(f"train.steps: {cfg.train.steps} (now), but the checkpoint is already at step {step}: the run "
                       "would train nothing and end past train.steps")
    if refused:
        saved_config = checkpoint.parent.parent / "config.json"
        raise ResumeRefused(
            f"cannot resume from {checkpoint}: this run differs from the saved one in what a resume cannot "
            "change:\n  " + "\n  ".join(refused) + "\n"
            f"Resume with the saved values (they are in {checkpoint / COMPLETE}, and in {saved_config} until a run "
            "overwrites it), or start a new run in another train.output_dir (train.init_from can take this "
            f"checkpoint's weights where the towers match). A resume may change: {ACCEPTED_SUMMARY}.")
    return accepted
