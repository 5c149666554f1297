"""The CLIP model: an image tower, a text tower and a learnable temperature; and its builder.

DeepSpeed stays out of here: the model takes images, token ids and (in training) a keep function
for the image tokens, and returns normalised embeddings, the logit scale and (for the SigLIP
loss) the logit bias. Everything the loss needs comes out of forward, so ZeRO-3, which gathers
parameters only inside forward, needs no special cases.
"""
from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from megapgs.config import ModelConfig
from megapgs.models.archs import ArchSpec, get_arch
from megapgs.models.attention import resolve_backend
from megapgs.models.partitioned import is_partitioned
from megapgs.models.text import TextTower
from megapgs.models.vit import KeepFn, VisionTower

log = logging.getLogger(__name__)

LOGIT_SCALE_MAX = 100.0


class CLIPOutput(NamedTuple):
    image: torch.Tensor                # (B, E) unit-norm
    text: torch.Tensor                 # (B, E) unit-norm
    logit_scale: torch.Tensor          # 0-d, exp of the parameter, at most 100
    logit_bias: torch.Tensor | None    # 0-d SigLIP bias, None for CLIP's loss


class CLIP(nn.Module):
    def __init__(self, spec: ArchSpec, init_logit_scale: float = math.log(1 / 0.07),
                 init_logit_bias: float | None = None):
        """OpenCLIP's initial temperature; SigLIP uses init_logit_scale=log(10), init_logit_bias=-10."""
        super().__init__()
        self.spec = spec
        self.visual = VisionTower(spec.vision, spec.embed_dim)
        self.text = TextTower(spec.text, spec.embed_dim)
        # shape (1,), not OpenCLIP's 0-d: DeepSpeed's model broadcast cannot view a 0-d tensor as bytes
        # (convert/openclip.py reshapes them)
        self.logit_scale = nn.Parameter(torch.tensor([float(init_logit_scale)]))
        self.logit_bias = nn.Parameter(torch.tensor([float(init_logit_bias)])) if init_logit_bias is not None else None

    def encode_image(self, images_BCHW: torch.Tensor, keep: KeepFn | None = None, normalize: bool = True) -> torch.Tensor:
        features = self.visual(images_BCHW, keep)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens_BC: torch.Tensor, lengths: torch.Tensor | list[int] | None = None,
                    normalize: bool = True) -> torch.Tensor:
        features = self.text(tokens_BC, lengths)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images_BCHW: torch.Tensor, tokens_BC: torch.Tensor,
                text_lengths: torch.Tensor | list[int] | None = None,
                keep: KeepFn | None = None) -> CLIPOutput:
        return CLIPOutput(self.encode_image(images_BCHW, keep), self.encode_text(tokens_BC, text_lengths),
                          self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX).reshape(()),
                          self.logit_bias.reshape(()) if self.logit_bias is not None else None)

    def set_attention(self, backend: str) -> None:
        self.visual.transformer.backend = backend
        self.text.transformer.backend = backend

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.visual.transformer.grad_checkpointing = enabled
        self.text.transformer.grad_checkpointing = enabled


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                training: bool = True, siglip: bool = False) -> CLIP:
    """The configured CLIP on `device`: attention back-end resolved once for the device and the
    compute dtype and activation checkpointing as configured (`compile_blocks` compiles). `siglip`
    adds the logit bias and SigLIP's initial temperature."""
    device = torch.device(device)
    spec = get_arch(cfg.arch)
    model = CLIP(spec, init_logit_scale=math.log(10), init_logit_bias=-10.0) if siglip else CLIP(spec)
    if not any(is_partitioned(p) for p in model.parameters()):  # zero.Init already put its shards on the device
        model = model.to(device)
    backend = resolve_backend(cfg.attention, device, dtype, training)
    log.info("attention back-end: %s (requested %s)", backend, cfg.attention)
    model.set_attention(backend)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model


def compile_blocks(model: CLIP) -> None:
    """torch.compile each transformer block's forward: the module's own call (and the hooks that
    ZeRO-3 puts on it, to gather its parameters) stays eager around the compiled code, so this
    works whether or not DeepSpeed has wrapped the model, before or after. Blocks of a tower share
    one compiled graph; a token budget keeps the image tower's shapes static."""
    for tower in (model.visual, model.text):
        for block in tower.transformer.resblocks:
            block.forward = torch.compile(block.forward)
