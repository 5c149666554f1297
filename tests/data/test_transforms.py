import random

import numpy as np
import open_clip
import torch
import torchvision.transforms as T
from PIL import Image

from megapgs.data.transforms import crop_params, derive_seed, eval_pixels, eval_transform, normalize, train_transform


def _image(width=64, height=48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3)).astype(np.uint8))


def test_eval_transform_is_openclips():
    image = _image()
    openclip_val = open_clip.image_transform(32, is_train=False)
    assert torch.allclose(eval_transform(image, 32), openclip_val(image), atol=1e-6)


def test_crop_params_follow_torchvision_distribution():
    """Our seeded draw and torchvision's RandomResizedCrop.get_params cover the same crops."""
    width, height, scale = 64, 48, (0.3, 1.0)
    rng = random.Random(0)
    ours = np.array([crop_params(width, height, scale, rng) for _ in range(3000)], dtype=float)
    torch.manual_seed(0)
    theirs = np.array([T.RandomResizedCrop.get_params(_image(), list(scale), [3 / 4, 4 / 3]) for _ in range(3000)],
                      dtype=float)
    for column in range(4):
        assert abs(ours[:, column].mean() - theirs[:, column].mean()) < 0.05 * max(width, height), column
    area = ours[:, 2] * ours[:, 3] / (width * height)
    assert area.min() >= 0.29 and area.max() <= 1.0
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()


def test_train_transform_is_seeded_per_sample():
    image = _image()
    first = train_transform(image, 32, (0.5, 1.0), random.Random(derive_seed(0, "crop", 7)))
    again = train_transform(image, 32, (0.5, 1.0), random.Random(derive_seed(0, "crop", 7)))
    other = train_transform(image, 32, (0.5, 1.0), random.Random(derive_seed(0, "crop", 8)))
    assert first.shape == (3, 32, 32) and torch.equal(first, again) and not torch.equal(first, other)
    assert derive_seed(0, "crop", 7) == 4657982541655453768  # the same in every process and run (no salted hash())


def _old_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """What the loaders did per image before they normalised per batch: torchvision's two calls."""
    import torchvision.transforms.functional as TF
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return TF.normalize(TF.to_tensor(image), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


def test_a_normalised_batch_equals_torchvisions_per_image_transform():
    images = [_image(40 + i, 30 + 2 * i) for i in range(5)]
    pixels = [eval_pixels(image, 24) for image in images]
    assert all(p.dtype == torch.uint8 and p.shape == (3, 24, 24) for p in pixels)
    one_by_one = torch.stack([_old_normalized_tensor(_resized_and_cropped(image, 24)) for image in images])
    assert torch.equal(normalize(pixels), one_by_one)  # bit for bit


def _resized_and_cropped(image: Image.Image, size: int) -> Image.Image:
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    return TF.center_crop(TF.resize(image, size, interpolation=InterpolationMode.BICUBIC), [size, size])


def test_an_image_of_the_right_size_is_not_resampled():
    image = _image(24, 24)
    assert torch.equal(eval_pixels(image, 24), torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
