"""Real photos that ship inside scikit-image, as the image tower sees them: for PGS's
figures, its edge checks and its benchmarks (no download, no data directory)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")


def load_photo(name: str, size: int) -> torch.Tensor:
    """(3, size, size) float in [0, 1]: skimage.data.<name>, centre-cropped to a square and
    resized with antialiasing. Grey photos are repeated over the three channels."""
    import skimage.data

    if name not in PHOTOS and not hasattr(skimage.data, name):
        raise ValueError(f"unknown scikit-image photo {name!r}; try one of {', '.join(PHOTOS)}")
    array = getattr(skimage.data, name)()
    image = torch.as_tensor(array).float() / 255.0
    if image.ndim == 2:
        image = image[..., None].expand(-1, -1, 3)
    image = image[..., :3].permute(2, 0, 1)                                  # (3, H, W)
    height, width = image.shape[1:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[:, top:top + side, left:left + side]
    return F.interpolate(square[None], size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp(0, 1)


def normalize(images_BCHW: torch.Tensor) -> torch.Tensor:
    """CLIP's per-channel normalisation (OpenCLIP's OPENAI_DATASET_MEAN / STD)."""
    mean = torch.tensor(OPENAI_DATASET_MEAN, device=images_BCHW.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, device=images_BCHW.device).view(1, 3, 1, 1)
    return (images_BCHW - mean) / std


def photo_batch(size: int, names: tuple[str, ...] = PHOTOS) -> torch.Tensor:
    """(len(names), 3, size, size): the photos, normalised for the tower."""
    return normalize(torch.stack([load_photo(name, size) for name in names]))
