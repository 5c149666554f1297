"""FLOPs of a packed CLIP step, counted from the sequence lengths (for MFU).

Counted: every matmul (2 FLOPs per multiply-add) and attention's two batched products
(q·kᵀ and p·v) over each sequence's own length, which is what packed varlen kernels compute.
Causal attention computes about half its score matrix; flash kernels skip the rest, so it counts
half. Norms, softmax, GELU and embedding look-ups are left out (a few percent, by convention).
Training = 3 x forward (backward ~ 2 x forward); recomputation from activation checkpointing is
not counted, as in the usual MFU definition.
"""
from __future__ import annotations

from typing import Sequence

import torch

from megapgs.models.archs import ArchSpec
from megapgs.packed import Packed

# Dense bf16 peak of one GPU, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def _lengths(packed_or_lengths: Packed | Sequence[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(packed_or_lengths, Packed):
        if packed_or_lengths.host_lengths is None:
            raise ValueError("this Packed has no host lengths; build it with Packed.from_lengths")
        return packed_or_lengths.host_lengths
    return torch.as_tensor(packed_or_lengths, dtype=torch.int64, device="cpu")


def transformer_flops_from_sums(tokens: int, sum_sq: int, width: int, mlp_width: int, layers: int,
                                causal: bool) -> int:
    """Forward FLOPs of `layers` pre-LN blocks over packed sequences whose lengths n_i have
    sum(n_i) = tokens and sum(n_i^2) = sum_sq (all a count needs: the training loop keeps these two
    sums on the device and reads them every N steps)."""
    linear = 2 * tokens * (3 * width * width + width * width + 2 * width * mlp_width)
    scores = 2 * 2 * sum_sq * width  # q·kᵀ and p·v, all heads together
    return layers * (linear + (scores // 2 if causal else scores))


def transformer_flops(lengths: Packed | Sequence[int] | torch.Tensor, width: int, mlp_width: int, layers: int,
                      causal: bool) -> int:
    """Forward FLOPs of `layers` pre-LN blocks over packed sequences of these lengths."""
    lens = _lengths(lengths)
    return transformer_flops_from_sums(int(lens.sum()), int((lens * lens).sum()), width, mlp_width, layers, causal)


def clip_forward_flops_from_sums(spec: ArchSpec, images: int, image_tokens: int, image_sq: int, texts: int,
                                 text_tokens: int, text_sq: int) -> dict[str, int]:
    """Forward FLOPs of CLIP over `images` image sequences (CLS + kept patches) and `texts` text
    sequences, from the sums of their lengths and squared lengths. Padding rows of a token
    budget are not counted: they are not the model's work."""
    v, t = spec.vision, spec.text
    patch_embed = 2 * images * v.num_patches * 3 * v.patch_size**2 * v.width  # every patch, before PGS
    vision = patch_embed + transformer_flops_from_sums(image_tokens, image_sq, v.width, v.mlp_width, v.layers,
                                                       causal=False) + 2 * images * v.width * spec.embed_dim
    text = transformer_flops_from_sums(text_tokens, text_sq, t.width, t.mlp_width, t.layers, causal=True) \
        + 2 * texts * t.width * spec.embed_dim
    return {"vision": vision, "text": text, "total": vision + text}


def clip_forward_flops(spec: ArchSpec, image_lengths: Packed | Sequence[int] | torch.Tensor,
                       text_lengths: Packed | Sequence[int] | torch.Tensor) -> dict[str, int]:
    """Forward FLOPs of one CLIP batch: image sequences (CLS + kept patches) and text sequences."""
    image, text = _lengths(image_lengths), _lengths(text_lengths)
    return clip_forward_flops_from_sums(spec, len(image), int(image.sum()), int((image * image).sum()),
                                        len(text), int(text.sum()), int((text * text).sum()))


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of this GPU, or None when unknown (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def mfu(train_flops_per_step: float, step_seconds: float, peak: float | None, world_size: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s per GPU over the GPU's peak."""
    if peak is None or step_seconds <= 0:
        return None
    return train_flops_per_step / step_seconds / world_size / peak
