"""Photos in shards and the helpers that compare a GPU loader with its CPU twin (DALI, nvJPEG)."""
from __future__ import annotations

import io
import weakref
from pathlib import Path

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from megapgs.config import DataConfig
from megapgs.data.eval_data import iter_eval_batches
from megapgs.data.faults import SkipCounter
from megapgs.data.shard_index import IndexedShard, index_shards, read_index_manifest
from megapgs.data.shards import MANIFEST, write_shards

IMAGE_SIZE = 48
STD_255 = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1) * 255  # normalised units -> 0..255 units
MEAN_255 = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1) * 255
# Measured: both decode JPEG with libjpeg-turbo, bit-identically; the difference is the bicubic
# resampling (PIL rounds to uint8 between its horizontal and vertical passes, DALI does not): a few
# levels on a few edge pixels, 0.2 on average. A geometry one pixel off shows as several levels on
# average and fails MEAN_ABS_DIFF_255.
MAX_ABS_DIFF_255, MEAN_ABS_DIFF_255, SHARE_OVER_2_LEVELS = 16.0, 0.5, 0.01


def data_config(tmp: Path, **overrides) -> DataConfig:
    return DataConfig(root=str(tmp / "root"), workers=1, **({"shuffle_buffer": 0, "augment": False} | overrides))


def photo_shards(out_dir: Path) -> list[str]:
    """Photos of many shapes (portrait, landscape, square; up- and down-scaled; odd and even
    excess for the centre crop), as JPEG, a PNG and a grayscale JPEG, in two shards."""
    import skimage.data

    photo = skimage.data.astronaut()
    rng = np.random.default_rng(0)
    samples = []
    for i in range(20):
        height, width = (int(v) for v in rng.integers(30, 140, 2))
        top, left = (int(v) for v in rng.integers(0, 512 - 2 * max(height, width), 2))
        pixels = photo[top:top + 2 * height:2, left:left + 2 * width:2]
        fmt = "PNG" if i == 7 else "JPEG"
        image = Image.fromarray(pixels).convert("L") if i == 11 else Image.fromarray(pixels)
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
        samples.append({"__key__": f"photo{i:03d}", "jpg" if fmt == "JPEG" else "png": buffer.getvalue(),
                        "txt": f"an astronaut, crop {i}".encode()})
    write_shards(iter(samples), out_dir, shard_size=10, total=len(samples))
    return [str(out_dir / f"{i}.tar") for i in range(2)]


def indexed(shards, folder: Path) -> list[IndexedShard]:
    """The shards as a GPU loader takes them: indexed (checked) into `folder`, read from its manifest."""
    index_shards([str(s) for s in shards], folder, processes=1, progress=False)
    return read_index_manifest(folder / MANIFEST)[0]


class DaliEpochs:
    """An endless loader (DALI's) read epoch by epoch, by the epoch each sample carries."""

    def __init__(self, loader):
        self.loader, self.batches, self.held, self.epoch = loader, iter(loader), [], 0

    def next_epoch(self) -> tuple[list[str], dict[str, torch.Tensor], dict[str, int]]:
        """(keys, {key: image}, the loader's skip counts once its last sample was delivered). Batches
        that straddle two epochs make the counts include the next epoch's first window: use batch
        sizes that divide an epoch where the counts matter."""
        keys, images = [], {}
        samples, before, after = self.held, None, SkipCounter(self.loader.skips.counts).counts
        while True:
            for i, (key, image, epoch) in enumerate(samples):
                if epoch > self.epoch:  # the counts once the epoch's last sample was delivered
                    self.held = [s for s in samples if s[2] > self.epoch]
                    self.epoch += 1
                    return keys, images, before if i == 0 and before is not None else after
                keys.append(key)
                images[key] = image
            batch = next(self.batches)
            check_batch(batch)
            before, after = after, SkipCounter(self.loader.skips.counts).counts
            samples = list(zip(batch.keys, batch.images, batch.epochs))


_ENDLESS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_batch(batch) -> None:
    assert batch.images.dtype == torch.float32 and batch.images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch.tokens.dtype == torch.int64 and batch.tokens.shape[0] == len(batch.keys)
    assert len(batch.text_lengths) == len(batch.keys)


def epoch(loader) -> tuple[list[str], dict[str, torch.Tensor]]:
    """One epoch of a loader whose iteration is one epoch (nvJPEG's), or the next one of an endless
    loader with a stream position (DALI's)."""
    if hasattr(loader, "position"):
        if loader not in _ENDLESS:
            _ENDLESS[loader] = DaliEpochs(loader)
        return _ENDLESS[loader].next_epoch()[:2]
    keys, images = [], {}
    for batch in loader:
        check_batch(batch)
        keys += batch.keys
        images.update(zip(batch.keys, batch.images))
    return keys, images


def pil_images(shards) -> dict:
    """{key: image} as the CPU (PIL) loader decodes and resizes them, augmentation off."""
    reference = {}
    for images, _, _, keys in iter_eval_batches(shards, image_size=IMAGE_SIZE, batch_size=8):
        reference.update(zip(keys, images))
    return reference


def pixel_diff_255(images: dict, reference: dict, keys) -> torch.Tensor:
    """|images - reference| in 0..255 pixel levels."""
    return (torch.stack([images[k] for k in keys]) - torch.stack([reference[k] for k in keys])).abs() * STD_255


def assert_matches_the_pil_loader(build_loader, tmp_path: Path, tokenizer, label: str) -> None:
    """A loader (DALI's, nvJPEG's; built on the CPU, augmentation off) delivers the PIL loader's
    samples in tar order, with pixels within the resampling differences measured above."""
    shards = photo_shards(tmp_path / "photos")
    reference = pil_images(shards)
    loader = build_loader(data_config(tmp_path), indexed(shards, tmp_path / "index"), image_size=IMAGE_SIZE,
                          tokenizer=tokenizer, batch_size=5, rank=0, world_size=1, seed=0, device="cpu")
    keys, images = epoch(loader)
    assert sorted(keys) == sorted(reference) and len(set(keys)) == len(keys)  # each sample once
    diff_255 = pixel_diff_255(images, reference, keys)
    print(f"\n{label} vs PIL loader, {len(keys)} images at {IMAGE_SIZE}px: max |diff| {diff_255.max():.2f}, "
          f"mean |diff| {diff_255.mean():.3f}, share > 2 levels {(diff_255 > 2).float().mean():.4f} (0..255 units)")
    assert diff_255.max() <= MAX_ABS_DIFF_255
    assert diff_255.mean() <= MEAN_ABS_DIFF_255
    assert (diff_255 > 2).float().mean() <= SHARE_OVER_2_LEVELS


def assert_gpu_matches_the_cpu_twin(build_loader, tmp_path: Path, tokenizer, label: str) -> None:
    """The loader decoding on the GPU delivers the samples of its CPU twin, on the GPU, with pixels
    within the resampling differences measured above."""
    shards = indexed(photo_shards(tmp_path / "photos"), tmp_path / "index")
    results = {}
    for device in ("cpu", "cuda"):
        loader = build_loader(data_config(tmp_path), shards, image_size=IMAGE_SIZE, tokenizer=tokenizer,
                              batch_size=5, rank=0, world_size=1, seed=0, device=device)
        keys, images = epoch(loader)
        assert all(image.device.type == device for image in images.values())
        results[device] = keys, torch.stack([images[k].float().cpu() for k in keys])
    assert results["cpu"][0] == results["cuda"][0]
    diff_255 = (results["cpu"][1] - results["cuda"][1]).abs() * STD_255
    print(f"\n{label} vs its CPU twin: max |diff| {diff_255.max():.2f}, mean {diff_255.mean():.3f} (0..255)")
    assert diff_255.max() <= MAX_ABS_DIFF_255 and diff_255.mean() <= MEAN_ABS_DIFF_255
