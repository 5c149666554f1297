"""OpenCLIP's image transforms on PIL images, with the random draw made explicit.

Train (`augment: true`): RandomResizedCrop(image_size, scale=crop_scale, ratio=(3/4, 4/3),
bicubic) -> ToTensor -> Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD), as OpenCLIP's
`image_transform(is_train=True)` without its optional extras. Eval (and `augment: false`):
Resize(shorter side = image_size, bicubic) -> CenterCrop(image_size) -> ToTensor -> Normalize.

Loaders split each transform in two: the per-image part on PIL images ends in uint8 pixels
(`train_pixels`, `eval_pixels`), and ToTensor + Normalize fill the batch (`normalize`): the same
numbers, without torchvision's per-call overhead (the embedded default's loader spent 150 of its
470 microseconds a sample in it).

torchvision's RandomResizedCrop draws from the process-global torch RNG; here each sample's crop
comes from its own `random.Random`, seeded from (run seed, epoch, place in the stream), so that a
stream is a pure function of its position (exact resume) and never touches the trainer's RNG.
"""
from __future__ import annotations

import hashlib
import math
import random
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torchvision.transforms import InterpolationMode

CROP_RATIO = (3 / 4, 4 / 3)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, the same in every process (unlike `hash()`)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def crop_params(width: int, height: int, scale: tuple[float, float], rng: random.Random,
                ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width): torchvision's RandomResizedCrop.get_params, drawn
    from `rng`. Ten tries at a random area and aspect ratio, then a centred crop of the nearest
    allowed ratio."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = rng.randint(0, height - crop_h)
            left = rng.randint(0, width - crop_w)
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, int(round(height * max(ratio)))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def pixels_of(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 of an RGB PIL image: what a loader ships (a quarter of float32's bytes)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def normalize(pixels: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """uint8 images (3, H, W) -> one float32 batch (B, 3, H, W), normalised: ToTensor then CLIP's
    per-channel Normalize, the same operations in the same order, so the numbers equal
    torchvision's per-image calls bit for bit (tests/data/test_transforms.py). Image by image into
    one output: each image stays in the cache through its four passes (a 224-px batch of 32
    normalised at once streams 19 MB through memory four times, which is slower), and the calls are
    plain tensor ops, without torchvision's per-call checks (most of a 28-px image's cost)."""
    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float32).view(-1, 1, 1)
    out = torch.empty((len(pixels), *pixels[0].shape), dtype=torch.float32)
    for image, normalized in zip(pixels, out):
        normalized.copy_(image).div_(255).sub_(mean).div_(std)
    return out


def train_pixels(image: Image.Image, image_size: int, scale: tuple[float, float], rng: random.Random) -> torch.Tensor:
    """RGB PIL image -> (3, image_size, image_size) uint8, random resized crop (bicubic)."""
    top, left, crop_h, crop_w = crop_params(image.width, image.height, scale, rng)
    cropped = TF.resized_crop(image, top, left, crop_h, crop_w, [image_size, image_size],
                              interpolation=InterpolationMode.BICUBIC)
    return pixels_of(cropped)


def eval_pixels(image: Image.Image, image_size: int) -> torch.Tensor:
    """RGB PIL image -> (3, image_size, image_size) uint8: resize the shorter side (bicubic), centre crop."""
    if image.size != (image_size, image_size):
        image = TF.center_crop(TF.resize(image, image_size, interpolation=InterpolationMode.BICUBIC),
                               [image_size, image_size])
    return pixels_of(image)


def train_transform(image: Image.Image, image_size: int, scale: tuple[float, float],
                    rng: random.Random) -> torch.Tensor:
    """RGB PIL image -> (3, image_size, image_size) float32, random resized crop, normalised."""
    return normalize([train_pixels(image, image_size, scale, rng)])[0]


def eval_transform(image: Image.Image, image_size: int) -> torch.Tensor:
    """RGB PIL image -> (3, image_size, image_size) float32: resize, centre crop, normalise."""
    return normalize([eval_pixels(image, image_size)])[0]
