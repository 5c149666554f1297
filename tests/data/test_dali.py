"""The DALI loader in DALI's CPU-only mode (every run) and on the GPU (where CUDA is present):
agreement with the CPU loader, the planted-fault shard set, bad images found only by the
decoder, unreadable data, and the split of an epoch over ranks."""
from __future__ import annotations

import time

import pytest
import torch

from megapgs.data import dali_checks
from megapgs.data.dali import build_dali_loader
from megapgs.data.dali_checks import check_shard, read_checked_index
from megapgs.data.prepare import DataError
from megapgs.data.shards import write_shards
from megapgs.data.tokenizer import Tokenizer
from tests.data.faulty_shards import write_faulty_shards
from tests.data.loader_photos import (IMAGE_SIZE, MEAN_255, STD_255, assert_gpu_matches_the_cpu_twin,
                                     assert_matches_the_pil_loader, data_config, epoch, photo_shards)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer("tiny-28")


# ----------------------------------------------------------------------------- acceptance 1

def test_dali_cpu_mode_matches_the_cpu_loader(tmp_path, tokenizer):
    assert_matches_the_pil_loader(build_dali_loader, tmp_path, tokenizer, "DALI CPU mode")


def test_train_augmentation_crops_within_the_photo(tmp_path, tokenizer):
    shards = photo_shards(tmp_path / "photos")
    cfg = data_config(tmp_path, augment=True, crop_scale=(0.5, 0.6), shuffle_buffer=8)
    loader = build_dali_loader(cfg, shards, image_size=IMAGE_SIZE, tokenizer=tokenizer, batch_size=8,
                               rank=0, world_size=1, seed=0, device="cpu")
    first_keys, first = epoch(loader)
    second_keys, second = epoch(loader)
    assert sorted(first_keys) == sorted(second_keys) == [f"photo{i:03d}" for i in range(20)]
    assert first_keys != second_keys  # the shuffle differs per epoch
    assert all(not torch.equal(first[k], second[k]) for k in first)  # so do the crops
    pixels_255 = torch.stack(list(first.values())) * STD_255 + MEAN_255  # back to 0..255
    assert pixels_255.min() >= -1e-3 and pixels_255.max() <= 255 + 1e-3


# ----------------------------------------------------------------------------- acceptance 2

def test_planted_faults_are_skipped_and_counted(tmp_path, tokenizer):
    faulty = write_faulty_shards(tmp_path / "faulty")
    cfg = data_config(tmp_path, augment=True, shuffle_buffer=16)
    loader = build_dali_loader(cfg, [str(p) for p in faulty.shards], image_size=IMAGE_SIZE, tokenizer=tokenizer,
                               batch_size=4, rank=0, world_size=1, seed=0, device="cpu")
    assert loader.samples_per_epoch == len(faulty.good_keys)
    keys, _ = epoch(loader)
    assert sorted(keys) == sorted(faulty.good_keys)  # every good sample, once
    assert loader.skips.nonzero() == faulty.expected_skips
    keys, _ = epoch(loader)  # the next epoch meets the same faults again
    assert sorted(keys) == sorted(faulty.good_keys)
    assert loader.skips.nonzero() == {reason: 2 * n for reason, n in faulty.expected_skips.items()}


def test_bad_images_found_only_by_the_decoder_are_dropped_and_retried(tmp_path, tokenizer, monkeypatch):
    """With the cheap byte checks off, the corrupt and truncated JPEGs reach DALI's decoder: the
    failed batches are decoded with PIL on the host, the culprits counted, the rest fed again."""
    monkeypatch.setattr(dali_checks, "check_image", lambda data: None)
    faulty = write_faulty_shards(tmp_path / "faulty")
    loader = build_dali_loader(data_config(tmp_path, shuffle_buffer=16), [str(p) for p in faulty.shards],
                               image_size=IMAGE_SIZE, tokenizer=tokenizer, batch_size=4, rank=0, world_size=1,
                               seed=0, device="cpu")
    image_faults = {k for k, reason in faulty.fault_keys.items() if reason.startswith("image_")}
    assert loader.samples_per_epoch == len(faulty.good_keys) + len(image_faults)
    keys, _ = epoch(loader)
    assert sorted(keys) == sorted(faulty.good_keys)
    assert loader.skips.nonzero() == faulty.expected_skips  # the run-time reasons match the checks'
    assert loader._decoder_builds < 20
    keys, _ = epoch(loader)  # known culprits are dropped before the decoder from now on
    assert sorted(keys) == sorted(faulty.good_keys)


def test_entirely_unreadable_data_stops_with_data_error(tmp_path, tokenizer, monkeypatch):
    missing = [str(tmp_path / f"{i}.tar") for i in range(3)]
    (tmp_path / "1.tar").write_bytes(b"")
    with pytest.raises(DataError, match="no readable sample.*shard_missing"):
        build_dali_loader(data_config(tmp_path), missing, image_size=IMAGE_SIZE, tokenizer=tokenizer, batch_size=4,
                          rank=0, world_size=1, seed=0, device="cpu")
    # images that pass the byte checks (here: checks off) and none of which decodes
    monkeypatch.setattr(dali_checks, "check_image", lambda data: None)
    samples = [{"__key__": f"bad{i}", "jpg": b"\xff\xd8\xff\xe0" + bytes(50 + i), "txt": b"a caption"}
               for i in range(12)]
    write_shards(iter(samples), tmp_path / "bad", shard_size=6)
    loader = build_dali_loader(data_config(tmp_path), [str(tmp_path / "bad" / f"{i}.tar") for i in range(2)],
                               image_size=IMAGE_SIZE, tokenizer=tokenizer, batch_size=4, rank=0, world_size=1,
                               seed=0, device="cpu")
    start = time.monotonic()
    with pytest.raises(DataError, match="unreadable"):
        epoch(loader)
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
def test_two_ranks_cover_every_sample_once_perepoch(tmp_path, tokenizer, shuffle_buffer):
    faulty = write_faulty_shards(tmp_path / "faulty")
    loaders = [build_dali_loader(data_config(tmp_path, shuffle_buffer=shuffle_buffer, augment=True),
                                 [str(p) for p in faulty.shards], image_size=IMAGE_SIZE, tokenizer=tokenizer,
                                 batch_size=4, rank=rank, world_size=2, seed=0, device="cpu") for rank in range(2)]
    for _ in range(2):  # two epochs
        per_rank = [epoch(loader)[0] for loader in loaders]
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
        loader = build_dali_loader(data_config(tmp_path, resampled=True), [str(p) for p in faulty.shards],
                                   image_size=IMAGE_SIZE, tokenizer=tokenizer, batch_size=5, rank=rank,
                                   world_size=2, seed=0, device="cpu")
        assert loader.samples_per_epoch == 15
        orders.append(epoch(loader)[0])
    assert orders[0] != orders[1]
    assert set(orders[0]) | set(orders[1]) <= faulty.good_keys


# ----------------------------------------------------------------------------- GPU

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="DALI's mixed (GPU) decoding needs CUDA")
def test_mixed_mode_matches_cpu_mode(tmp_path, tokenizer):
    assert_gpu_matches_the_cpu_twin(build_dali_loader, tmp_path, tokenizer, "DALI mixed")
