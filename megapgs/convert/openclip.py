"""The key map between megapgs and OpenCLIP state dicts.

The towers are OpenCLIP's parameter for parameter, so the map is a renaming: OpenCLIP keeps the
text tower's parameters at the top level of its CLIP, megapgs under `text.`; the image tower
(`visual.`), `logit_scale` and SigLIP's `logit_bias` have the same names in both. Shapes are checked key by key.
"""
from __future__ import annotations

from typing import Mapping

import torch

TEXT_PREFIX = "text."


def to_openclip_key(key: str) -> str:
    return key[len(TEXT_PREFIX):] if key.startswith(TEXT_PREFIX) else key


def from_openclip_key(key: str) -> str:
    return key if key.startswith("visual.") or key in ("logit_scale", "logit_bias") else TEXT_PREFIX + key


# OpenCLIP keeps these as 0-d tensors; megapgs as shape (1,), because DeepSpeed's model broadcast
# views every parameter as bytes, which a 0-d tensor cannot do. The one place shapes differ.
SCALAR_KEYS = ("logit_scale", "logit_bias")
# OpenCLIP's and megapgs's initial SigLIP bias; in a model config it only says that a logit_bias exists.
SIGLIP_INIT_LOGIT_BIAS = -10.0


def _renamed(state: Mapping[str, torch.Tensor], rename, expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {rename(key): value for key, value in state.items()}
    for key in SCALAR_KEYS:
        if key in out and key in expected and out[key].numel() == 1:
            out[key] = out[key].reshape(expected[key].shape)
    missing, unexpected = sorted(set(expected) - set(out)), sorted(set(out) - set(expected))
    if missing or unexpected:
        raise KeyError(f"state dicts do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in out.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)} where {tuple(expected[key].shape)} is expected")
    return out


def to_openclip(state: Mapping[str, torch.Tensor], openclip_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """megapgs state dict -> OpenCLIP's, checked against the keys and shapes of `openclip_state`."""
    return _renamed(state, to_openclip_key, openclip_state)


def from_openclip(openclip_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP state dict -> megapgs's, checked against the keys and shapes of `state`."""
    return _renamed(openclip_state, from_openclip_key, state)


def openclip_model_cfg(spec, logit_bias: bool = False) -> dict:
    """OpenCLIP's model config for an ArchSpec: what `open_clip_config.json` holds under
    "model_cfg" for a custom architecture, and what builds the named ones. `logit_bias`: a SigLIP-
    trained model (OpenCLIP's CLIP then has a `logit_bias` parameter)."""
    vision, text = spec.vision, spec.text
    vision_cfg = {"image_size": vision.image_size, "patch_size": vision.patch_size, "width": vision.width,
                  "layers": vision.layers, "head_width": vision.head_width, "mlp_ratio": vision.mlp_ratio}
    text_cfg = {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
                "heads": text.heads, "layers": text.layers, "mlp_ratio": text.mlp_ratio}
    cfg = {"embed_dim": spec.embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    return {**cfg, "init_logit_bias": SIGLIP_INIT_LOGIT_BIAS} if logit_bias else cfg


def build_openclip_model(spec, logit_bias: bool = False) -> torch.nn.Module:
    """An OpenCLIP model of this architecture (random weights, fp32, CPU), without network: named
    architectures through open_clip's own config, custom ones from `openclip_model_cfg`."""
    import open_clip

    if spec.openclip_name is not None:
        extra = {"init_logit_bias": SIGLIP_INIT_LOGIT_BIAS} if logit_bias else {}
        return open_clip.create_model(spec.openclip_name, pretrained=None, **extra)
    return open_clip.model.CLIP(**openclip_model_cfg(spec, logit_bias))
