"""The model wrapped for training: AdamW param groups -> DeepSpeed engine (ZeRO, precision, clipping).

The order is fixed and documented here, once: seed -> build the CLIP (attention back-end,
activation checkpointing; under ZeRO-3 inside `deepspeed.zero.Init`, so each module's parameters
are cut into per-rank shards as it is built and no rank holds the whole model: the init scheme and
init_from gather one module at a time, megapgs/models/partitioned.py) -> the `train.init_from` weights, unless a checkpoint will be resumed ->
AdamW with weight decay only on matrices -> (ZeRO-3) transformer blocks as leaf modules -> the
DeepSpeed JSON completed with the batch sizes megapgs derives -> `deepspeed.initialize` -> compile
each block's forward (inside ZeRO-3's hooks, which stay eager). The learning rate is set on the optimizer each
step from `schedule.lr_at`, so there is no scheduler state.

`train.init_from` (an initial checkpoint from tools/convert_from_openclip.py, or a megapgs run or
checkpoint directory) is loaded into the model, module by module (into the shards under ZeRO-3),
before DeepSpeed wraps it. Its towers must be `model.arch`'s and its keys and shapes the
model's, with two exceptions: weights of another image size (same patch size) have their
positional embeddings interpolated to the model's grid (bicubic, CLS row kept: OpenCLIP's
resize_pos_embed; fine-tuning at another resolution, as FLIP and CLIPA do); and SigLIP training
(`train.loss: siglip`) from CLIP weights, which have no logit_bias, keeps the fresh logit_bias
(SigLIP's initial -10) and takes logit_scale from the weights. When `train.resume` finds a
checkpoint, init_from is not read at all (megapgs/train/start.py).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from megapgs.config import Config
from megapgs.convert.init_weights import ConversionError, init_fit_error, load_init_weights
from megapgs.dist import DistInfo, join_process_group
from megapgs.models.blocks import Block
from megapgs.models.clip import CLIP, build_model, compile_blocks
from megapgs.models.partitioned import full_shape, modifying
from megapgs.models.vit import resize_positional_embedding
from megapgs.train.plan import RunPlan
from megapgs.train.safe_load import UnsafeCheckpointError

log = logging.getLogger(__name__)

NO_DECAY_NAMES = ("token_embedding", "positional_embedding", "class_embedding", "logit_scale", "logit_bias")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on weight matrices only: norms, biases, embeddings and the logit scale/bias are exempt."""
    decay, exempt = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if len(full_shape(param)) < 2 or any(part in name for part in NO_DECAY_NAMES):  # a shard's own is 1-d
            exempt.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]


def _without_throughput_timer(timers: dict[str, Any]) -> dict[str, Any]:
    """The config's timers with DeepSpeed's throughput timer off unless it is asked for by name."""
    throughput = {"enabled": False, **timers.get("throughput", {})}
    return {**timers, "throughput": throughput}


def deepspeed_config(cfg: Config, plan: RunPlan, load_universal: bool = False) -> dict[str, Any]:
    """The config's DeepSpeed section plus what megapgs owns: the batch sizes; DeepSpeed's step
    printing and throughput timer off (megapgs logs, and the timer synchronises the device at
    every forward and step); bf16 gradients accumulated in fp32 unless the config says otherwise;
    `checkpoint.load_universal` when the resumed checkpoint is a Universal one (reshard.py)."""
    ds = {
        **cfg.deepspeed,
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "timers": _without_throughput_timer(cfg.deepspeed.get("timers", {})),
    }
    if cfg.precision == "bf16":
        ds["data_types"] = {"grad_accum_dtype": "fp32", **cfg.deepspeed.get("data_types", {})}
    if load_universal:
        ds["checkpoint"] = {**cfg.deepspeed.get("checkpoint", {}), "load_universal": True}
    return ds


class InitWeightsError(ValueError):
    """train.init_from names weights that do not fit the configured model."""


def load_init_from(model: CLIP, cfg: Config, init_from: str) -> None:
    """Load the `train.init_from` weights into the freshly built model (see the module doc for the two
    exceptions)."""
    where = f"train.init_from={init_from!r}"
    try:
        state, spec = load_init_weights(init_from)
    except (FileNotFoundError, ConversionError, UnsafeCheckpointError) as err:
        raise InitWeightsError(f"{where}: {err}") from None
    problem = init_fit_error(spec, model.spec)
    if problem:
        raise InitWeightsError(f"{where} {problem}")
    arch, resized = spec.name, ""
    if spec.vision.grid != model.spec.vision.grid and "visual.positional_embedding" in state:
        old, new = spec.vision.grid, model.spec.vision.grid
        state = {**state, "visual.positional_embedding":
                 resize_positional_embedding(state["visual.positional_embedding"], new)}
        resized = (f"; image positional embeddings interpolated from {old}x{old} ({spec.vision.image_size} px) to "
                   f"{new}x{new} ({model.spec.vision.image_size} px)")
    expected = {name: full_shape(tensor) for name, tensor in (*model.named_parameters(), *model.named_buffers())}
    fresh_bias = cfg.train.loss == "siglip" and "logit_bias" in expected and "logit_bias" not in state
    keep_fresh = {"logit_bias"} if fresh_bias else set()
    missing = sorted(set(expected) - set(state) - keep_fresh)
    unexpected = sorted(set(state) - set(expected))
    if unexpected == ["logit_bias"] and not missing:
        raise InitWeightsError(f"{where} has a logit_bias (SigLIP weights) and train.loss={cfg.train.loss!r} has "
                               "none; train with train.loss=siglip")
    if missing or unexpected:
        raise InitWeightsError(f"{where}: keys differ from {arch}'s: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    for key, value in state.items():
        if value.shape != expected[key]:
            raise InitWeightsError(f"{where}: {key} has shape {tuple(value.shape)} where {arch} has "
                                   f"{tuple(expected[key])}")
    load_whole(model, state)
    note = ""
    if fresh_bias:
        with modifying([model.logit_bias, model.logit_scale]):
            note = (f"; kept the fresh logit_bias = {float(model.logit_bias.detach()):g} (the weights have none), "
                    f"logit_scale = {float(model.logit_scale.detach()):.4f} from the weights")
    log.info("initial weights: %s from %s (%d tensors)%s%s", arch, init_from, len(state), resized, note)


def load_whole(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state`'s tensors (keys and shapes checked) into the model, module by module: under
    zero.Init each module's parameters are gathered whole only while their values are copied."""
    with torch.no_grad():
        for prefix, module in model.named_modules():
            own = {f"{prefix}.{name}" if prefix else name: tensor
                   for name, tensor in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))}
            own = {name: tensor for name, tensor in own.items() if name in state}
            if own:
                with modifying(own.values()):
                    for name, tensor in own.items():
                        tensor.data.copy_(state[name])


def build_engine(cfg: Config, plan: RunPlan, dist: DistInfo, init_from: str | None = None,
                 load_universal: bool = False):
    """(DeepSpeed engine, the bare CLIP inside it). Same seed on every rank: same initial weights;
    `init_from` (megapgs/train/start.py decides it) replaces them before ZeRO partitions the model;
    `load_universal`: the engine will load a Universal Checkpoint (megapgs/train/reshard.py)."""
    import deepspeed

    join_process_group(dist)  # a one-rank group for a plain `python pretrain.py`
    torch.manual_seed(cfg.train.seed)
    dtype = DTYPES[cfg.precision]
    ds_config = deepspeed_config(cfg, plan, load_universal)
    partitioned = cfg.zero_stage == 3 and cfg.model.partitioned_init
    # ZeRO-3: each module's parameters are cut into this rank's shard as soon as it is built, so no
    # rank ever holds the whole model (F.linear is left alone: mem_efficient_linear would change numerics)
    building = deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False) if partitioned \
        else contextlib.nullcontext()
    with building:
        model: CLIP = build_model(cfg.model, dist.device, dtype, training=True, siglip=cfg.train.loss == "siglip")
    if init_from:
        load_init_from(model, cfg, init_from)
    groups = param_groups(model, cfg.optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  fused=True)  # one kernel per group; step counts stay on the device
    if cfg.zero_stage == 3:  # ZeRO-3 gathers a block's parameters at once, with one hook outside the block
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [Block])
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                      dist_init_required=False)
    if dist.world_size == 1 and cfg.zero_stage == 0:
        # one rank, no ZeRO: the gradient all-reduce is the identity, and DeepSpeed's fallback
        # would still flatten every gradient into buckets and copy it back, twice per step
        engine.enable_backward_allreduce = False
    if cfg.model.compile:
        compile_blocks(model)
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    held = f"; built partitioned (zero.Init): this rank holds {sum(p.ds_tensor.numel() for p in model.parameters()):,}" \
        if partitioned else ""
    log.info("engine: DeepSpeed ZeRO-%d, %s, %s parameters, %d rank(s)%s", cfg.zero_stage, cfg.precision,
             f"{params:,}", dist.world_size, held)
    return engine, model


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
