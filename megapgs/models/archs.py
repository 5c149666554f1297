"""Architectures by name, with OpenCLIP's hyper-parameters.

The named ViTs carry exactly the numbers of OpenCLIP's `model_configs/<name>.json` (a test compares
them), so a checkpoint converts by renaming keys. The `tiny-*` entries are ours: small enough to train
on a 2-core CPU (the embedded default) and to run in tests.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VisionSpec:
    image_size: int
    patch_size: int
    width: int
    layers: int
    head_width: int = 64
    mlp_ratio: float = 4.0

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid(self) -> int:
        """Patches per side; the sequence has grid**2 patch tokens plus CLS."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class TextSpec:
    context_length: int
    width: int
    heads: int
    layers: int
    vocab_size: int = 49408  # OpenCLIP's BPE tokenizer
    mlp_ratio: float = 4.0

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    embed_dim: int
    vision: VisionSpec
    text: TextSpec
    openclip_name: str | None  # None: not an OpenCLIP built-in (converted as a model directory)


_OPENCLIP_TEXT_B = TextSpec(context_length=77, width=512, heads=8, layers=12)

ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in [
        ArchSpec("ViT-B-32", 512, VisionSpec(224, 32, 768, 12), _OPENCLIP_TEXT_B, "ViT-B-32"),
        ArchSpec("ViT-B-16", 512, VisionSpec(224, 16, 768, 12), _OPENCLIP_TEXT_B, "ViT-B-16"),
        ArchSpec("ViT-L-14", 768, VisionSpec(224, 14, 1024, 24),
                 TextSpec(77, 768, 12, 12), "ViT-L-14"),
        ArchSpec("ViT-H-14", 1024, VisionSpec(224, 14, 1280, 32, head_width=80),
                 TextSpec(77, 1024, 16, 24), "ViT-H-14"),
        ArchSpec("ViT-g-14", 1024, VisionSpec(224, 14, 1408, 40, head_width=88, mlp_ratio=4.3637),
                 TextSpec(77, 1024, 16, 24), "ViT-g-14"),
        ArchSpec("ViT-bigG-14", 1280, VisionSpec(224, 14, 1664, 48, head_width=104, mlp_ratio=4.9231),
                 TextSpec(77, 1280, 20, 32), "ViT-bigG-14"),
        # 28 px grey-scale photos (Fashion-MNIST), 4 px patches: a 7x7 grid, L = 49. Width 96 keeps a
        # step of batch 128 near 0.3 s on 2 CPU cores (width 128: 0.45 s), for the 5-minute default.
        ArchSpec("tiny-28", 64, VisionSpec(28, 4, 96, 4, head_width=32),
                 TextSpec(16, 64, 2, 2), None),
        # The same towers at 32 px / 8 px patches (L = 16): the smallest model, for tests.
        ArchSpec("tiny-32", 32, VisionSpec(32, 8, 64, 2, head_width=32),
                 TextSpec(16, 32, 2, 2), None),
    ]
}


def get_arch(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}") from None
