"""The DALI loader in DALI's CPU-only mode (every run) and on the GPU (where CUDA is present):
agreement with the CPU loader, the planted-fault shard set, bad images found only by the
decoder, unreadable data, every rank its own shards, windows, and exact resume."""
from __future__ import annotations

import json
import time

import pytest
import torch

from megapgs.data import shard_index
from megapgs.data.dali import build_dali_loader
from megapgs.data.faults import DataError
from megapgs.data.shards import write_shards
from megapgs.data.tokenizer import Tokenizer
from megapgs.data.wds import rank_epoch_shards
from tests.data.faulty_shards import write_faulty_shards
from tests.data.loader_photos import (IMAGE_SIZE, MEAN_255, STD_255, DaliEpochs, assert_gpu_matches_the_cpu_twin,
                                     assert_matches_the_pil_loader, data_config, epoch, indexed, photo_shards)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer("tiny-28")


def photo_sizes(shards) -> dict[str, tuple[int, int]]:
    """(width, height) of each indexed photo."""
    import io

    from PIL import Image

    from megapgs.data.shard_index import read_index

    sizes = {}
    for shard in shards:
        with open(shard.path, "rb") as fh:
            for sample in read_index(shard.index):
                fh.seek(sample.image[1])
                sizes[sample.key] = Image.open(io.BytesIO(fh.read(sample.image[2]))).size
    return sizes


def faulty_loader(tmp_path, tokenizer, *, rank=0, world_size=1, batch_size=5, **config):
    faulty = write_faulty_shards(tmp_path / "faulty")
    shards = indexed(faulty.shards, tmp_path / "index")
    loader = build_dali_loader(data_config(tmp_path, **config), shards, image_size=IMAGE_SIZE, tokenizer=tokenizer,
                               batch_size=batch_size, rank=rank, world_size=world_size, seed=0, device="cpu")
    return faulty, shards, loader


# ----------------------------------------------------------------------------- acceptance 1

def test_dali_cpu_mode_matches_the_cpu_loader(tmp_path, tokenizer):
    assert_matches_the_pil_loader(build_dali_loader, tmp_path, tokenizer, "DALI CPU mode")


def test_train_augmentation_crops_within_the_photo(tmp_path, tokenizer):
    shards = indexed(photo_shards(tmp_path / "photos"), tmp_path / "index")
    cfg = data_config(tmp_path, augment=True, crop_scale=(0.5, 0.6), shuffle_buffer=8)
    loader = build_dali_loader(cfg, shards, image_size=IMAGE_SIZE, tokenizer=tokenizer, batch_size=5,
                               rank=0, world_size=1, seed=0, device="cpu")
    first_keys, first = epoch(loader)
    second_keys, second = epoch(loader)
    assert sorted(first_keys) == sorted(second_keys) == [f"photo{i:03d}" for i in range(20)]
    assert first_keys != second_keys  # the shuffle differs per epoch
    croppable = {key for key, (width, height) in photo_sizes(shards).items()  # a crop of 0.5..0.6 of the area
                 if max(3 / 4, 0.5 * width / height) <= min(4 / 3, 2 * width / height)}  # fits at ratio 3/4..4/3
    assert len(croppable) >= 15  # the others (long thin photos) get DALI's fallback: the whole image
    assert all(not torch.equal(first[k], second[k]) for k in croppable)  # the crops differ per epoch
    pixels_255 = torch.stack(list(first.values())) * STD_255 + MEAN_255  # back to 0..255
    assert pixels_255.min() >= -1e-3 and pixels_255.max() <= 255 + 1e-3


# ----------------------------------------------------------------------------- acceptance 2

def test_planted_faults_are_skipped_and_counted(tmp_path, tokenizer):
    faulty, _, loader = faulty_loader(tmp_path, tokenizer, augment=True, shuffle_buffer=16)
    assert loader.samples_per_epoch == len(faulty.good_keys)
    epochs = DaliEpochs(loader)  # 30 good samples in batches of 5: no batch straddles two epochs
    for number in (1, 2):  # the next epoch meets the same faults again
        keys, _, skips = epochs.next_epoch()
        assert sorted(keys) == sorted(faulty.good_keys)  # every good sample, once
        assert {r: n for r, n in skips.items() if n} == {r: number * n for r, n in faulty.expected_skips.items()}


def test_bad_images_found_only_by_the_decoder_are_dropped_and_retried(tmp_path, tokenizer, monkeypatch):
    """With the cheap byte checks off at indexing, the corrupt and truncated JPEGs reach DALI's decoder:
    the failed batches are decoded with PIL on the host, the culprits counted, the rest fed again."""
    monkeypatch.setattr(shard_index, "check_image", lambda data: None)
    faulty, _, loader = faulty_loader(tmp_path, tokenizer, shuffle_buffer=16)
    image_faults = {k for k, reason in faulty.fault_keys.items() if reason.startswith("image_")}
    assert loader.samples_per_epoch == len(faulty.good_keys) + len(image_faults)
    epochs = DaliEpochs(loader)
    keys, _, skips = epochs.next_epoch()
    assert sorted(keys) == sorted(faulty.good_keys)
    assert {r: n for r, n in skips.items() if n} == faulty.expected_skips  # the run-time reasons match the checks'
    assert loader._decoder_builds < 20
    keys, _, _ = epochs.next_epoch()  # known culprits are dropped before the decoder from now on
    assert sorted(keys) == sorted(faulty.good_keys)


def test_entirely_unreadable_data_stops_with_data_error(tmp_path, tokenizer, monkeypatch):
    missing = [str(tmp_path / f"{i}.tar") for i in range(3)]
    (tmp_path / "1.tar").write_bytes(b"")
    with pytest.raises(DataError, match="no readable sample"):
        build_dali_loader(data_config(tmp_path), indexed(missing, tmp_path / "index0"), image_size=IMAGE_SIZE,
                          tokenizer=tokenizer, batch_size=4, rank=0, world_size=1, seed=0, device="cpu")
    # images that pass the byte checks (here: checks off) and none of which decodes
    monkeypatch.setattr(shard_index, "check_image", lambda data: None)
    samples = [{"__key__": f"bad{i}", "jpg": b"\xff\xd8\xff\xe0" + bytes(50 + i), "txt": b"a caption"}
               for i in range(12)]
    write_shards(iter(samples), tmp_path / "bad", shard_size=6)
    shards = indexed([tmp_path / "bad" / f"{i}.tar" for i in range(2)], tmp_path / "index1")
    loader = build_dali_loader(data_config(tmp_path), shards, image_size=IMAGE_SIZE, tokenizer=tokenizer,
                               batch_size=4, rank=0, world_size=1, seed=0, device="cpu")
    start = time.monotonic()
    with pytest.raises(DataError, match="unreadable"):
        next(iter(loader))
    assert time.monotonic() - start < 30
    assert loader.bad_keys.keys() >= {f"bad{i}" for i in range(8)}


def test_a_shard_changed_after_indexing_is_skipped_and_counted(tmp_path, tokenizer):
    faulty, shards, loader = faulty_loader(tmp_path, tokenizer, batch_size=11)  # 22 samples left: 2 batches
    data = faulty.shards[3].read_bytes()
    faulty.shards[3].write_bytes(data + bytes(1024))  # grown since it was indexed: the stat tells
    keys, _, skips = DaliEpochs(loader).next_epoch()
    assert sorted(keys) == sorted(k for k in faulty.good_keys if not k.startswith("s3_"))
    assert skips["shard_changed"] == 1


# ----------------------------------------------------------------------------- every rank its own shards

@pytest.mark.parametrize("shuffle_buffer", [0, 16])
def test_two_ranks_read_their_own_shards_and_cover_every_sample_once_per_epoch(tmp_path, tokenizer, shuffle_buffer):
    faulty = write_faulty_shards(tmp_path / "faulty")
    shards = indexed(faulty.shards, tmp_path / "index")
    epochs = [DaliEpochs(build_dali_loader(data_config(tmp_path, shuffle_buffer=shuffle_buffer, augment=True),
                                           shards, image_size=IMAGE_SIZE, tokenizer=tokenizer, batch_size=3,
                                           rank=rank, world_size=2, seed=0, device="cpu")) for rank in range(2)]
    for number in range(2):  # two epochs, each a new split of the shards
        per_rank = [e.next_epoch()[0] for e in epochs]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == sorted(faulty.good_keys)
        for rank, keys in enumerate(per_rank):  # each rank read exactly the shards the split gave it
            mine = {f"s{i}_" for i in rank_epoch_shards(len(shards), rank, 2, 0, number)}
            assert all(key[:3] in mine for key in keys)


def test_a_rank_holds_a_window_of_shards_at_a_time(tmp_path, tokenizer, monkeypatch):
    from megapgs.data import dali_stream

    opened = []
    real = dali_stream.open_window
    monkeypatch.setattr(dali_stream, "open_window", lambda spec, indices: opened.append(list(indices))
                        or real(spec, indices))
    faulty, _, loader = faulty_loader(tmp_path, tokenizer, dali_window_shards=2)
    keys, _, _ = DaliEpochs(loader).next_epoch()
    assert sorted(keys) == sorted(faulty.good_keys)
    assert [len(w) for w in opened[:3]] == [2, 2, 2] and sorted(sum(opened[:3], [])) == list(range(6))


def test_resampled_ranks_draw_their_own_windows(tmp_path, tokenizer):
    orders = []
    for rank in range(2):
        faulty, _, loader = faulty_loader(tmp_path / str(rank), tokenizer, rank=rank, world_size=2, resampled=True,
                                          dali_window_shards=3)
        assert loader.samples_per_epoch == 15
        batches = iter(loader)
        orders.append([key for _ in range(6) for key in next(batches).keys])
        assert set(orders[-1]) <= faulty.good_keys
    assert orders[0] != orders[1]


# ----------------------------------------------------------------------------- exact resume

@pytest.mark.parametrize("config", [dict(shuffle_buffer=16, dali_window_shards=2), dict(resampled=True,
                                                                                        dali_window_shards=2)])
def test_a_resumed_loader_delivers_the_batches_the_uninterrupted_one_would_have(tmp_path, tokenizer, config):
    faulty, shards, straight = faulty_loader(tmp_path, tokenizer, batch_size=4, **config)
    batches = iter(straight)
    first = [next(batches).keys for _ in range(11)]  # into the second epoch (30 a epoch), mid-window
    state = straight.state_dict()
    rest = [next(batches).keys for _ in range(12)]
    resumed = build_dali_loader(data_config(tmp_path, **config), shards, image_size=IMAGE_SIZE, tokenizer=tokenizer,
                                batch_size=4, rank=0, world_size=1, seed=0, device="cpu")
    resumed.load_state_dict(state)
    again = iter(resumed)
    assert [next(again).keys for _ in range(12)] == rest
    assert first != rest
    assert resumed.skips.counts == straight.skips.counts  # the same skips delivered by the same point


# ----------------------------------------------------------------------------- GPU

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="DALI's mixed (GPU) decoding needs CUDA")
def test_mixed_mode_matches_cpu_mode(tmp_path, tokenizer):
    assert_gpu_matches_the_cpu_twin(build_dali_loader, tmp_path, tokenizer, "DALI mixed")


def test_a_run_on_other_ranks_starts_the_next_epoch_with_the_skip_counts(tmp_path, tokenizer):
    """Saved by 2 ranks, resumed on 3: every rank starts the epoch after the newest an old rank was
    in, and the old ranks' skip counts are carried once."""
    olds = [faulty_loader(tmp_path / f"old{r}", tokenizer, rank=r, world_size=2, batch_size=2)[2] for r in (0, 1)]
    for loader in olds:
        _ = [b for _, b in zip(range(5), loader)]
    states = [json.loads(json.dumps(loader.state_dict())) for loader in olds]
    total = {reason: sum(s["skips"][reason] for s in states) for reason in states[0]["skips"]}
    assert sum(total.values()) > 0  # the planted faults were met, so the check below can fail
    news = [faulty_loader(tmp_path / f"new{r}", tokenizer, rank=r, world_size=3, batch_size=2)[2] for r in range(3)]
    for loader in news:
        loader.load_other_world_states(states, samples_seen=20)
    assert {reason: sum(loader.skips.counts[reason] for loader in news) for reason in total} == total
    newest = max(s["position"]["epoch"] for s in states)
    assert all(next(iter(loader)).epochs[0] == newest + 1 for loader in news)
