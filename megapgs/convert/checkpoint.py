"""Weights out of a megapgs training checkpoint, whatever ZeRO stage wrote it.

A checkpoint directory (`<run>/checkpoints/step_XXXXXXXX`, complete: it has COMPLETE) holds the
run's resolved config in COMPLETE, and DeepSpeed's files. Under ZeRO 1-3 the fp32 master weights
live partitioned in the ranks' optimizer states (ZeRO-3 partitions the parameters too): DeepSpeed's
own `zero_to_fp32` consolidates them, in lazy mode, so shards are memory-mapped and materialised
one tensor at a time. It unpickles without torch's weights-only guard, so the files are vetted
first (megapgs/train/safe_load.py). ZeRO-0 keeps whole weights (in the training precision) in
`mp_rank_00_model_states.pt`, which loads with `weights_only=True`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megapgs.train.checkpoint import COMPLETE, complete_checkpoints
from megapgs.train.safe_load import deepspeed_types, load_weights_only, vet_checkpoint_dir


def resolve_checkpoint(path: Path) -> Path:
    """A complete checkpoint directory: `path` itself, or the newest one under a run directory or
    its checkpoints/ folder."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    for folder in (path, path / "checkpoints"):
        found = complete_checkpoints(folder)
        if found:
            return found[-1]
    raise FileNotFoundError(f"no complete megapgs checkpoint at or under {path} (a step_* directory with {COMPLETE})")


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(fp32 megapgs state dict, the run's config as a dict) of a complete checkpoint."""
    path = resolve_checkpoint(path)
    config = json.loads((path / COMPLETE).read_text())["config"]
    stage = int(config.get("deepspeed", {}).get("zero_optimization", {}).get("stage", 0))
    if stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        vet_checkpoint_dir(path)
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name, lazy_mode=True)
        state = {key: tensor.contiguous() for key, tensor in lazy.items()}  # one tensor at a time
    else:
        files = load_weights_only(path / "mp_rank_00_model_states.pt", allow=deepspeed_types(), mmap=True)
        state = files["module"]
    return {key: value.float() for key, value in state.items()}, config


def clip_from_state(spec, state: dict[str, torch.Tensor]):
    """A megapgs CLIP (eval mode) holding exactly these tensors, without allocating a second copy;
    a `logit_bias` in the state makes it a SigLIP model."""
    from megapgs.models.clip import CLIP

    with torch.device("meta"):
        model = CLIP(spec, init_logit_bias=0.0 if "logit_bias" in state else None)
    model.load_state_dict(state, assign=True)
    return model.eval()
