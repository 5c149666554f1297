"""Architectures: megapgs's own tiny ones by name, OpenCLIP's by name, or an OpenCLIP model-config JSON.

`model.arch` (and every tool that reads a run's arch) goes through `get_arch`:

    tiny-28, tiny-32          megapgs's own, small enough to train on a 2-core CPU (OWN_ARCHS)
    ViT-B-16, ViT-M-16, ...   any model config bundled with open_clip whose towers megapgs computes
                              (`openclip_arch_names()`; the numbers are read from open_clip itself)
    path/to/cfg.json          an OpenCLIP model config ({"embed_dim", "vision_cfg", "text_cfg"}), or an
                              OpenCLIP model directory's open_clip_config.json (its "model_cfg")

Which OpenCLIP options megapgs computes is decided in one place, `megapgs/models/openclip_cfg.py`, for
`model.arch` and both conversion tools alike. Only megapgs's own names are known without importing
open_clip, so validating the embedded default stays instant.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path


class ArchError(ValueError):
    """An architecture megapgs cannot build; the message names the name, file or option."""


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
    name: str                   # what model.arch says: a name, or the path of a model-config JSON
    embed_dim: int
    vision: VisionSpec
    text: TextSpec
    openclip_name: str | None   # None: not an OpenCLIP built-in (converted as a model directory)

    def numbers(self) -> dict[str, int | float]:
        """Every number of the towers, flat ("vision.width": 768, ...): what makes two archs the same."""
        return {"embed_dim": self.embed_dim,
                **{f"vision.{key}": value for key, value in dataclasses.asdict(self.vision).items()},
                **{f"text.{key}": value for key, value in dataclasses.asdict(self.text).items()}}

    def describe(self) -> str:
        v, t = self.vision, self.text
        return (f"{v.image_size} px / {v.patch_size} px patches, vision {v.layers}x{v.width}, "
                f"text {t.layers}x{t.width} ({t.context_length} tokens), embed {self.embed_dim}")


OWN_ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in [
        # 28 px grey-scale photos (Fashion-MNIST), 4 px patches: a 7x7 grid, L = 49. Width 96 keeps a
        # step of batch 128 near 0.3 s on 2 CPU cores (width 128: 0.45 s), for the 5-minute default.
        ArchSpec("tiny-28", 64, VisionSpec(28, 4, 96, 4, head_width=32), TextSpec(16, 64, 2, 2), None),
        # The same towers at 32 px / 8 px patches (L = 16): the smallest model, for tests.
        ArchSpec("tiny-32", 32, VisionSpec(32, 8, 64, 2, head_width=32), TextSpec(16, 32, 2, 2), None),
    ]
}


def openclip_arch_names() -> tuple[str, ...]:
    """OpenCLIP's bundled model-config names whose towers megapgs computes (imports open_clip)."""
    from megapgs.models.openclip_cfg import openclip_specs

    return tuple(openclip_specs())


def get_arch(arch: str | ArchSpec) -> ArchSpec:
    """The ArchSpec of a model.arch value (an ArchSpec is returned as it is), or ArchError."""
    if isinstance(arch, ArchSpec):
        return arch
    if not isinstance(arch, str) or not arch:
        raise ArchError(f"an architecture is a name or a path, not {arch!r}")
    if arch in OWN_ARCHS:
        return OWN_ARCHS[arch]
    from megapgs.models.openclip_cfg import arch_from_file, openclip_arch

    spec = openclip_arch(arch)  # None: not one of OpenCLIP's names; ArchError: one megapgs does not compute
    if spec is not None:
        return spec
    if Path(arch).is_file():
        return arch_from_file(arch)
    if arch.endswith(".json") or "/" in arch:
        raise ArchError(f"no model-config JSON at {arch}")
    known = [*OWN_ARCHS, *openclip_arch_names()]
    close = difflib.get_close_matches(arch, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ArchError(f"unknown architecture {arch!r}{hint}; allowed: {', '.join(OWN_ARCHS)}, one of OpenCLIP's "
                    f"{len(known) - len(OWN_ARCHS)} ViT configs megapgs computes (python -m megapgs.config "
                    "--explain lists them), or the path of an OpenCLIP model-config JSON")


def init_mismatch(weights: ArchSpec, model: ArchSpec) -> list[str]:
    """What keeps weights of arch `weights` from initialising a model of arch `model`: every number
    that differs, except the image size (the positional embeddings are interpolated to the model's
    grid, as FLIP and CLIPA fine-tune at another resolution). [] when they fit."""
    have, want = weights.numbers(), model.numbers()
    return [f"{key} {have[key]} vs {want[key]}" for key in want
            if key != "vision.image_size" and have[key] != want[key]]
