"""The self-check of both conversion tools: a megapgs CLIP and an OpenCLIP model of the same weights
give the same image and text embeddings (fp32, CPU, a few fixed inputs) and the same logit scale
and bias. Above PARITY_TOLERANCE relative error, or with any scalar different, a tool fails."""
from __future__ import annotations

from dataclasses import dataclass

import torch

PARITY_TOLERANCE = 1e-5
CHECK_CAPTIONS = ["a photo of a cat.", "a black and white photo of a coat.", "an image", "two dogs on a beach at night."]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@dataclass(frozen=True)
class Parity:
    image_err: float
    text_err: float
    scalars_equal: bool   # logit_scale equal, logit_bias equal or absent in both

    @property
    def ok(self) -> bool:
        return max(self.image_err, self.text_err) <= PARITY_TOLERANCE and self.scalars_equal

    def describe(self, arch: str, source: object) -> str:
        return (f"parity: {arch} from {source}: image embeddings rel. error {self.image_err:.2e}, text "
                f"{self.text_err:.2e} (limit {PARITY_TOLERANCE:g}), logit scale/bias "
                f"{'equal' if self.scalars_equal else 'DIFFERENT'}")


def _scalar(model: torch.nn.Module, name: str) -> float | None:
    value = getattr(model, name, None)
    return None if value is None else float(value.detach())


@torch.no_grad()
def compare(ours, theirs: torch.nn.Module, spec) -> Parity:
    """megapgs CLIP `ours` (unmasked) against OpenCLIP model `theirs`, both in eval mode."""
    from megapgs.data.tokenizer import Tokenizer

    size = spec.vision.image_size
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens, lengths = Tokenizer(spec)(CHECK_CAPTIONS)
    image_err = rel_err(theirs.encode_image(images, normalize=True), ours.encode_image(images))
    text_err = rel_err(theirs.encode_text(tokens, normalize=True), ours.encode_text(tokens, lengths))
    scalars_equal = all(_scalar(ours, name) == _scalar(theirs, name) for name in ("logit_scale", "logit_bias"))
    return Parity(image_err, text_err, scalars_equal)
