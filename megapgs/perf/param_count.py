"""The parameters of a CLIP, counted from its ArchSpec alone (no model built): what the memory estimate needs.

One entry per parameter tensor, named and shaped as `megapgs/models/` makes them (vit.py, text.py,
blocks.py, clip.py), so ZeRO-3's per-tensor rules (parameters below
`stage3_param_persistence_threshold` elements stay whole on every rank) and the largest leaf module
(a transformer block, gathered at once) come out of the same list. tests/perf/test_memory.py holds
the list to `model.named_parameters()` of every arch the configs name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from megapgs.models.archs import ArchSpec


@dataclass(frozen=True)
class ParamTensor:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


def block_tensors(prefix: str, width: int, mlp_width: int) -> list[ParamTensor]:
    """One pre-LN block (blocks.py): ln_1, attention (packed in_proj, out_proj), ln_2, MLP."""
    shapes = {"ln_1.weight": (width,), "ln_1.bias": (width,),
              "attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
              "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
              "ln_2.weight": (width,), "ln_2.bias": (width,),
              "mlp.c_fc.weight": (mlp_width, width), "mlp.c_fc.bias": (mlp_width,),
              "mlp.c_proj.weight": (width, mlp_width), "mlp.c_proj.bias": (width,)}
    return [ParamTensor(f"{prefix}.{name}", shape) for name, shape in shapes.items()]


def clip_tensors(spec: ArchSpec, siglip: bool = False) -> list[ParamTensor]:
    """Every parameter tensor of `CLIP(spec)` (with SigLIP's logit_bias when `siglip`)."""
    v, t, E = spec.vision, spec.text, spec.embed_dim
    D = v.width
    tensors = [ParamTensor("visual.class_embedding", (D,)),
               ParamTensor("visual.positional_embedding", (v.num_patches + 1, D)),
               ParamTensor("visual.proj", (D, E)),
               ParamTensor("visual.conv1.weight", (D, 3, v.patch_size, v.patch_size)),
               ParamTensor("visual.ln_pre.weight", (D,)), ParamTensor("visual.ln_pre.bias", (D,))]
    for i in range(v.layers):
        tensors += block_tensors(f"visual.transformer.resblocks.{i}", D, v.mlp_width)
    tensors += [ParamTensor("visual.ln_post.weight", (D,)), ParamTensor("visual.ln_post.bias", (D,)),
                ParamTensor("text.positional_embedding", (t.context_length, t.width)),
                ParamTensor("text.text_projection", (t.width, E)),
                ParamTensor("text.token_embedding.weight", (t.vocab_size, t.width))]
    for i in range(t.layers):
        tensors += block_tensors(f"text.transformer.resblocks.{i}", t.width, t.mlp_width)
    tensors += [ParamTensor("text.ln_final.weight", (t.width,)), ParamTensor("text.ln_final.bias", (t.width,)),
                ParamTensor("logit_scale", (1,))]
    if siglip:
        tensors.append(ParamTensor("logit_bias", (1,)))
    return tensors


def _block_of(name: str) -> str | None:
    """"visual.transformer.resblocks.3" for any parameter of that block, None outside the blocks."""
    match = re.match(r"(.*\.resblocks\.\d+)\.", name)
    return match.group(1) if match else None


@dataclass(frozen=True)
class ParamCounts:
    total: int                 # every parameter
    vision: int
    text: int
    largest_tensor: int        # the largest single tensor (the token embedding, in OpenCLIP's towers)
    largest_block: int         # the largest transformer block: ZeRO-3 gathers one at a time (a leaf module)

    def persistent(self, tensors: list[ParamTensor], threshold: int) -> int:
        """Elements of the tensors ZeRO-3 keeps whole on every rank: those of at most `threshold` elements
        (DeepSpeed's `stage3_param_persistence_threshold`; parameter_offload.py compares with `<=`)."""
        return sum(p.numel for p in tensors if p.numel <= threshold)


def count_params(spec: ArchSpec, siglip: bool = False) -> tuple[ParamCounts, list[ParamTensor]]:
    tensors = clip_tensors(spec, siglip)
    blocks: dict[str, int] = {}
    for p in tensors:
        block = _block_of(p.name)
        if block:
            blocks[block] = blocks.get(block, 0) + p.numel
    counts = ParamCounts(total=sum(p.numel for p in tensors),
                         vision=sum(p.numel for p in tensors if p.name.startswith("visual.")),
                         text=sum(p.numel for p in tensors if p.name.startswith("text.")),
                         largest_tensor=max(p.numel for p in tensors),
                         largest_block=max(blocks.values()))
    return counts, tensors


def gather_units(tensors: list[ParamTensor], persistence_threshold: int) -> list[int]:
    """Elements ZeRO-3 gathers at once: each transformer block whole (a leaf module, train/engine.py),
    every other non-persistent tensor alone."""
    units: dict[str, int] = {}
    for p in tensors:
        if p.numel <= persistence_threshold:
            continue
        key = _block_of(p.name) or p.name
        units[key] = units.get(key, 0) + p.numel
    return list(units.values())

