"""The DALI loader in DALI's CPU-only mode (every run) and on the GPU (where CUDA is present):
agreement with the CPU loader, the planted-fault shard set, bad images found only by the
decoder, unreadable data, and the split of an epoch over ranks."""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from megapgs.config import DataConfig
from megapgs.data import dali_checks
from megapgs.data.dali import build_dali_loader
from megapgs.data.dali_checks import check_shard, read_checked_index
from megapgs.data.nvjpeg import build_nvjpeg_loader, decode_batch, is_jpeg
from megapgs.data.prepare import DataError
from megapgs.data.shards import write_shards
from megapgs.data.tokenizer import Tokenizer
from megapgs.data.eval_data import iter_eval_batches
from tests.data.faulty_shards import write_faulty_shards

IMAGE_SIZE = 48
STD_255 = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1) * 255  # normalised units -> 0..255 units
MEAN_255 = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1) * 255
# Measured: both decode JPEG with libjpeg-turbo, bit-identically; the difference is the bicubic
# resampling (PIL rounds to uint8 between its horizontal and vertical passes, DALI does not): a few
# levels on a few edge pixels, 0.2 on average. A geometry one pixel off shows as several levels on
# average and fails MEAN_ABS_DIFF_255.
MAX_ABS_DIFF_255, MEAN_ABS_DIFF_255, SHARE_OVER_2_LEVELS = 16.0, 0.5, 0.01


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer("tiny-28")


def _cfg(tmp: Path, **overrides) -> DataConfig:
    return DataConfig(root=str(tmp / "root"), workers=1, **({"shuffle_buffer": 0, "augment": False} | overrides))


def _photo_shards(out_dir: Path) -> list[str]:
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


def _epoch(loader) -> tuple[list[str], dict[str, torch.Tensor]]:
    keys, images = [], {}
    for batch in loader:
        assert batch.images.dtype == torch.float32 and batch.images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch.tokens.dtype == torch.int64 and batch.tokens.shape[0] == len(batch.keys)
        assert len(batch.text_lengths) == len(batch.keys)
        keys += batch.keys
        images.update(zip(batch.keys, batch.images))
    return keys, images


def _pil_images(shards) -> dict:
    """{key: image} as the CPU (PIL) loader decodes and resizes them, augmentation off."""
    reference = {}
    for images, _, _, keys in iter_eval_batches(shards, image_size=IMAGE_SIZE, batch_size=8):
        reference.update(zip(keys, images))
    return reference


def _diff_255(images: dict, reference: dict, keys) -> torch.Tensor:
    """|images - reference| in 0..255 pixel levels."""
    return (torch.stack([images[k] for k in keys]) - torch.stack([reference[k] for k in keys])).abs() * STD_255


# ----------------------------------------------------------------------------- acceptance 1

def test_dali_cpu_mode_matches_the_cpu_loader(tmp_path, tokenizer):
    shards = _photo_shards(tmp_path / "photos")
    reference = _pil_images(shards)
    loader = build_dali_loader(_cfg(tmp_path), shards, image_size=IMAGE_SIZE, tokenizer=tokenizer,
                               batch_size=6, rank=0, world_size=1, seed=0, device="cpu")
    keys, images = _epoch(loader)
    assert keys == list(reference)  # same samples, in tar order (no shuffle)
    diff_255 = _diff_255(images, reference, keys)
    print(f"\nDALI CPU vs PIL loader, {len(keys)} images at {IMAGE_SIZE}px: max |diff| {diff_255.max():.2f}, "
          f"mean |diff| {diff_255.mean():.3f}, share > 2 levels {(diff_255 > 2).float().mean():.4f} (0..255 units)")
    assert diff_255.max() <= MAX_ABS_DIFF_255
    assert diff_255.mean() <= MEAN_ABS_DIFF_255
    assert (diff_255 > 2).float().mean() <= SHARE_OVER_2_LEVELS


def test_train_augmentation_crops_within_the_photo(tmp_path, tokenizer):
    shards = _photo_shards(tmp_path / "photos")
    cfg = _cfg(tmp_path, augment=True, crop_scale=(0.5, 0.6), shuffle_buffer=8)
    loader = build_dali_loader(cfg, shards, image_size=IMAGE_SIZE, tokenizer=tokenizer, batch_size=8,
                               rank=0, world_size=1, seed=0, device="cpu")
    first_keys, first = _epoch(loader)
    second_keys, second = _epoch(loader)
    assert sorted(first_keys) == sorted(second_keys) == [f"photo{i:03d}" for i in range(20)]
    assert first_keys != second_keys  # the shuffle differs per epoch
    assert all(not torch.equal(first[k], second[k]) for k in first)  # so do the crops
    pixels_255 = torch.stack(list(first.values())) * STD_255 + MEAN_255  # back to 0..255
    assert pixels_255.min() >= -1e-3 and pixels_255.max() <= 255 + 1e-3


# ----------------------------------------------------------------------------- acceptance 2

def test_planted_faults_are_skipped_and_counted(tmp_path, tokenizer):
    faulty = write_faulty_shards(tmp_path / "faulty")
    cfg = _cfg(tmp_path, augment=True, shuffle_buffer=16)
    loader = build_dali_loader(cfg, [str(p) for p in faulty.shards], image_size=IMAGE_SIZE, tokenizer=tokenizer,
                               batch_size=4, rank=0, world_size=1, seed=0, device="cpu")
    assert loader.samples_per_epoch == len(faulty.good_keys)
    keys, _ = _epoch(loader)
    assert sorted(keys) == sorted(faulty.good_keys)  # every good sample, once
    assert loader.skips.nonzero() == faulty.expected_skips
    keys, _ = _epoch(loader)  # the next epoch meets the same faults again
    assert sorted(keys) == sorted(faulty.good_keys)
    assert loader.skips.nonzero() == {reason: 2 * n for reason, n in faulty.expected_skips.items()}


def test_bad_images_found_only_by_the_decoder_are_dropped_and_retried(tmp_path, tokenizer, monkeypatch):
    """With the cheap byte checks off, the corrupt and truncated JPEGs reach DALI's decoder: the
    failed batches are decoded with PIL on the host, the culprits counted, the rest fed again."""
    monkeypatch.setattr(dali_checks, "check_image", lambda data: None)
    faulty = write_faulty_shards(tmp_path / "faulty")
    loader = build_dali_loader(_cfg(tmp_path, shuffle_buffer=16), [str(p) for p in faulty.shards],
                               image_size=IMAGE_SIZE, tokenizer=tokenizer, batch_size=4, rank=0, world_size=1,
                               seed=0, device="cpu")
    image_faults = {k for k, reason in faulty.fault_keys.items() if reason.startswith("image_")}
    assert loader.samples_per_epoch == len(faulty.good_keys) + len(image_faults)
    keys, _ = _epoch(loader)
    assert sorted(keys) == sorted(faulty.good_keys)
    assert loader.skips.nonzero() == faulty.expected_skips  # the run-time reasons match the checks'
    assert loader._decoder_builds < 20
    keys, _ = _epoch(loader)  # known culprits are dropped before the decoder from now on
    assert sorted(keys) == sorted(faulty.good_keys)


def test_entirely_unreadable_data_stops_with_data_error(tmp_path, tokenizer, monkeypatch):
    missing = [str(tmp_path / f"{i}.tar") for i in range(3)]
    (tmp_path / "1.tar").write_bytes(b"")
    with pytest.raises(DataError, match="no readable sample.*shard_missing"):
        build_dali_loader(_cfg(tmp_path), missing, image_size=IMAGE_SIZE, tokenizer=tokenizer, batch_size=4,
                          rank=0, world_size=1, seed=0, device="cpu")
    # images that pass the byte checks (here: checks off) and none of which decodes
    monkeypatch.setattr(dali_checks, "check_image", lambda data: None)
    samples = [{"__key__": f"bad{i}", "jpg": b"\xff\xd8\xff\xe0" + bytes(50 + i), "txt": b"a caption"}
               for i in range(12)]
    write_shards(iter(samples), tmp_path / "bad", shard_size=6)
    loader = build_dali_loader(_cfg(tmp_path), [str(tmp_path / "bad" / f"{i}.tar") for i in range(2)],
                               image_size=IMAGE_SIZE, tokenizer=tokenizer, batch_size=4, rank=0, world_size=1,
                               seed=0, device="cpu")
    start = time.monotonic()
    with pytest.raises(DataError, match="unreadable"):
        _epoch(loader)
    assert time.monotonic() - start < 30
    assert loader.skips.counts["image_undecodable"] == 12


def test_shard_checks_are_cached_and_redone_when_the_shard_changes(tmp_path):
    faulty = write_faulty_shards(tmp_path / "faulty")
    first = check_shard(faulty.shards[0], tmp_path / "cache")
    assert first.samples == 5 and first.skips == {"image_undecodable": 2, "caption_empty": 1}
    assert {s.key for s in read_checked_index(first.index_path)} == {
        k for k in faulty.good_keys if k.startswith("s0_")}
    stamp = first.index_path.stat().st_mtime_ns
    assert check_shard(faulty.shards[0], tmp_path / "cache") == first
    assert first.index_path.stat().st_mtime_ns == stamp  # read from the cache, not rewritten
    data = faulty.shards[3].read_bytes()
    faulty.shards[3].write_bytes(data[:len(data) // 2])  # damaged after its first check
    assert check_shard(faulty.shards[3], tmp_path / "cache").skips == {"tar_truncated": 1}
    faulty.shards[3].write_bytes(b"")
    assert check_shard(faulty.shards[3], tmp_path / "cache").skips == {"shard_empty": 1}


# ----------------------------------------------------------------------------- acceptance 3

@pytest.mark.parametrize("shuffle_buffer", [0, 16])
def test_two_ranks_cover_every_sample_once_per_epoch(tmp_path, tokenizer, shuffle_buffer):
    faulty = write_faulty_shards(tmp_path / "faulty")
    loaders = [build_dali_loader(_cfg(tmp_path, shuffle_buffer=shuffle_buffer, augment=True),
                                 [str(p) for p in faulty.shards], image_size=IMAGE_SIZE, tokenizer=tokenizer,
                                 batch_size=4, rank=rank, world_size=2, seed=0, device="cpu") for rank in range(2)]
    for _ in range(2):  # two epochs
        per_rank = [_epoch(loader)[0] for loader in loaders]
        assert [len(keys) for keys in per_rank] == [loader.samples_per_epoch for loader in loaders] == [15, 15]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == sorted(faulty.good_keys)
    summed = loaders[0].skips.counts
    for reason, count in loaders[1].skips.counts.items():
        summed[reason] += count
    assert {r: n for r, n in summed.items() if n} == {r: 2 * n for r, n in faulty.expected_skips.items()}


def test_resampled_ranks_read_in_different_orders(tmp_path, tokenizer):
    faulty = write_faulty_shards(tmp_path / "faulty")
    orders = []
    for rank in range(2):
        loader = build_dali_loader(_cfg(tmp_path, resampled=True), [str(p) for p in faulty.shards],
                                   image_size=IMAGE_SIZE, tokenizer=tokenizer, batch_size=5, rank=rank,
                                   world_size=2, seed=0, device="cpu")
        assert loader.samples_per_epoch == 15
        orders.append(_epoch(loader)[0])
    assert orders[0] != orders[1]
    assert set(orders[0]) | set(orders[1]) <= faulty.good_keys


# ----------------------------------------------------------------------------- GPU

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="DALI's mixed (GPU) decoding needs CUDA")
def test_mixed_mode_matches_cpu_mode(tmp_path, tokenizer):
    shards = _photo_shards(tmp_path / "photos")
    results = {}
    for device in ("cpu", "cuda"):
        loader = build_dali_loader(_cfg(tmp_path), shards, image_size=IMAGE_SIZE, tokenizer=tokenizer,
                                   batch_size=6, rank=0, world_size=1, seed=0, device=device)
        keys, images = _epoch(loader)
        results[device] = keys, torch.stack([images[k].float().cpu() for k in keys])
    assert results["cpu"][0] == results["cuda"][0]
    diff_255 = (results["cpu"][1] - results["cuda"][1]).abs() * STD_255
    print(f"\nDALI mixed vs CPU mode: max |diff| {diff_255.max():.2f}, mean {diff_255.mean():.3f} (0..255)")
    assert diff_255.max() <= MAX_ABS_DIFF_255 and diff_255.mean() <= MEAN_ABS_DIFF_255


# ----------------------------------------------------------------------------- nvJPEG (torchvision)

def test_nvjpeg_cpu_twin_matches_the_cpu_loader(tmp_path, tokenizer):
    shards = _photo_shards(tmp_path / "photos")
    reference = _pil_images(shards)
    loader = build_nvjpeg_loader(_cfg(tmp_path), shards, image_size=IMAGE_SIZE, tokenizer=tokenizer,
                                 batch_size=6, rank=0, world_size=1, seed=0, device="cpu")
    keys, images = _epoch(loader)
    assert keys == list(reference)
    diff_255 = _diff_255(images, reference, keys)
    print(f"\nnvJPEG loader (CPU twin) vs PIL loader: max |diff| {diff_255.max():.2f}, mean {diff_255.mean():.3f}, "
          f"share > 2 levels {(diff_255 > 2).float().mean():.4f} (0..255 units)")
    assert diff_255.max() <= MAX_ABS_DIFF_255
    assert diff_255.mean() <= MEAN_ABS_DIFF_255
    assert (diff_255 > 2).float().mean() <= SHARE_OVER_2_LEVELS


@pytest.mark.parametrize("byte_checks", [True, False])
def test_nvjpeg_planted_faults_are_skipped_and_counted(tmp_path, tokenizer, monkeypatch, byte_checks):
    """Without the byte checks the bad JPEGs reach decode_jpeg: their batch falls back to one
    decode per image, and each culprit is counted with the CPU loader's reason."""
    if not byte_checks:
        monkeypatch.setattr(dali_checks, "check_image", lambda data: None)
    faulty = write_faulty_shards(tmp_path / "faulty")
    loader = build_nvjpeg_loader(_cfg(tmp_path, augment=True, shuffle_buffer=16), [str(p) for p in faulty.shards],
                                 image_size=IMAGE_SIZE, tokenizer=tokenizer, batch_size=4, rank=0, world_size=1,
                                 seed=0, device="cpu")
    keys, _ = _epoch(loader)
    assert sorted(keys) == sorted(faulty.good_keys)
    assert loader.skips.nonzero() == faulty.expected_skips


def test_nvjpeg_decode_batch_isolates_a_bad_image():
    good = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 30, 40)).save(good, format="JPEG")
    png = io.BytesIO()
    Image.new("L", (7, 9), 128).save(png, format="PNG")
    encoded = [good.getvalue(), good.getvalue()[:200], png.getvalue(), b"not an image"]
    assert [is_jpeg(data) for data in encoded] == [True, True, False, False]
    images, reasons = decode_batch(encoded, torch.device("cpu"))
    assert reasons == [None, "image_truncated", None, "image_undecodable"]
    assert images[0].shape == (3, 10, 20) and images[2].shape == (3, 9, 7) and images[1] is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG decoding needs CUDA")
def test_nvjpeg_gpu_matches_its_cpu_twin(tmp_path, tokenizer):
    shards = _photo_shards(tmp_path / "photos")
    results = {}
    for device in ("cpu", "cuda"):
        loader = build_nvjpeg_loader(_cfg(tmp_path), shards, image_size=IMAGE_SIZE, tokenizer=tokenizer,
                                     batch_size=6, rank=0, world_size=1, seed=0, device=device)
        keys, images = _epoch(loader)
        assert all(image.device.type == device for image in images.values())
        results[device] = keys, torch.stack([images[k].cpu() for k in keys])
    assert results["cpu"][0] == results["cuda"][0]
    diff_255 = (results["cpu"][1] - results["cuda"][1]).abs() * STD_255
    print(f"\nnvJPEG GPU vs CPU twin: max |diff| {diff_255.max():.2f}, mean {diff_255.mean():.3f} (0..255)")
    assert diff_255.max() <= MAX_ABS_DIFF_255 and diff_255.mean() <= MEAN_ABS_DIFF_255
