"""The CPU loader: planted faults (acceptance 2), ranks x workers (3), exact resume (4)."""
import collections
import io
import json
import logging
import time

import numpy as np
import pytest
import torch
from PIL import Image

from megapgs.config import DataConfig
from megapgs.data import wds
from megapgs.data.eval_data import iter_eval_batches
from megapgs.data.faults import DataError, SkipCounter
from megapgs.data.prepare import resolve_shards
from megapgs.data.shards import write_shards
from megapgs.data.tokenizer import Tokenizer
from megapgs.data.wds import build_train_loader, epoch_shards
from tests.data.faulty_shards import write_faulty_shards

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    return write_faulty_shards(tmp_path_factory.mktemp("faulty"))


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer("tiny-32")


def _urls(faulty):
    return resolve_shards(str(faulty.manifest), "data.train_shards")[0]


def _loader(faulty, tokenizer, *, rank=0, world_size=1, workers=2, batch_size=4, seed=0, **cfg):
    cfg = DataConfig(workers=workers, shuffle_buffer=cfg.pop("shuffle_buffer", 16), **cfg)
    urls, samples = resolve_shards(str(faulty.manifest), "data.train_shards")
    return build_train_loader(cfg, urls, image_size=IMAGE_SIZE, tokenizer=tokenizer, batch_size=batch_size,
                              rank=rank, world_size=world_size, seed=seed, samples_per_epoch=samples)


def _epochs_keys(loader, epochs: int, max_batches: int = 200) -> dict[int, list[str]]:
    """Keys by epoch, iterating until every worker has moved past the first `epochs` epochs."""
    keys = collections.defaultdict(list)
    for count, batch in enumerate(loader):
        assert batch.images.shape == (len(batch.keys), 3, IMAGE_SIZE, IMAGE_SIZE)
        for key, epoch in zip(batch.keys, batch.epochs):
            keys[epoch].append(key)
        if min(epoch for epoch, _ in loader.positions) >= epochs or count >= max_batches:
            break
    return keys


@pytest.mark.parametrize("workers", [0, 2])
def test_planted_faults_are_skipped_and_counted(faulty, tokenizer, workers):
    """Acceptance 2: exactly the planted skips, and every good sample once per epoch."""
    loader = _loader(faulty, tokenizer, workers=workers)
    assert loader.samples_per_epoch == 48  # the manifest: samples as written, faulty ones included
    keys = _epochs_keys(loader, epochs=2)
    for epoch in (0, 1):
        assert collections.Counter(keys[epoch]) == collections.Counter(faulty.good_keys), epoch
        assert loader.skips_by_epoch[epoch].nonzero() == faulty.expected_skips, epoch
    assert keys[0] != keys[1]  # shards and samples are reshuffled each epoch


def test_batches_are_normalised_images_and_tokens(faulty, tokenizer):
    batch = next(iter(_loader(faulty, tokenizer, workers=0, batch_size=6)))
    assert batch.images.dtype == torch.float32 and batch.tokens.dtype == torch.int64
    assert batch.tokens.shape == (6, 16) and len(batch.text_lengths) == len(batch.keys) == 6
    assert batch.text_lengths == (batch.tokens.argmax(-1) + 1).tolist()
    assert -2.0 < batch.images.min() < 0 < batch.images.max() < 2.7  # CLIP-normalised [0, 1] pixels


def test_two_ranks_two_workers_deliver_each_sample_once(faulty, tokenizer):
    """Acceptance 3 (non-resampled): across ranks, each good sample once per epoch."""
    per_rank = [_loader(faulty, tokenizer, rank=rank, world_size=2, workers=2) for rank in (0, 1)]
    assert all(loader.spec.workers == 2 for loader in per_rank)
    keys = [_epochs_keys(loader, epochs=2) for loader in per_rank]
    for epoch in (0, 1):
        seen = collections.Counter(keys[0][epoch] + keys[1][epoch])
        assert seen == collections.Counter(faulty.good_keys), epoch
        skipped = SkipCounter()
        for loader in per_rank:
            skipped.merge(loader.skips_by_epoch[epoch])
        assert skipped.nonzero() == faulty.expected_skips
    assert set(keys[0][0]) != set(keys[0][1])  # a rank reads other shards in the next epoch


def test_resampled_ranks_draw_their_own_shards(faulty, tokenizer):
    """Acceptance 3 (resampled): each rank draws shards with replacement, in its own order."""
    specs = [_loader(faulty, tokenizer, rank=rank, world_size=2, workers=2, resampled=True).spec for rank in (0, 1)]
    draws = [[shard for epoch in range(6) for worker in (0, 1) for shard in epoch_shards(spec, epoch, worker)]
             for spec in specs]
    assert draws[0] != draws[1]
    assert len(draws[0]) == 6 * 3 and len(set(draws[0])) < len(draws[0])  # with replacement
    again = _loader(faulty, tokenizer, rank=0, world_size=2, workers=2, resampled=True).spec
    assert [epoch_shards(again, 0, w) for w in (0, 1)] == [epoch_shards(specs[0], 0, w) for w in (0, 1)]
    batch = next(iter(_loader(faulty, tokenizer, rank=1, world_size=2, workers=2, resampled=True)))
    assert len(batch.keys) == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_uninterrupted_batches(faulty, tokenizer, workers):
    """Acceptance 4: stop after N batches, save, restart: the next batches are the ones an
    uninterrupted run gives (crossing an epoch boundary, with faults and shuffling)."""
    stop_after, total = 5, 13
    uninterrupted = [b for _, b in zip(range(total), _loader(faulty, tokenizer, workers=workers, augment=True))]
    first = _loader(faulty, tokenizer, workers=workers, augment=True)
    stream = iter(first)
    for _ in range(stop_after):
        next(stream)
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint may store it as JSON
    stream.close()

    resumed = _loader(faulty, tokenizer, workers=workers, augment=True)
    resumed.load_state_dict(state)
    after = [b for _, b in zip(range(total - stop_after), resumed)]
    for expected, got in zip(uninterrupted[stop_after:], after):
        assert got.keys == expected.keys and got.epochs == expected.epochs
        assert torch.equal(got.images, expected.images) and torch.equal(got.tokens, expected.tokens)
    assert {0, 1} <= {e for b in after for e in b.epochs}, "the resumed run should cross an epoch boundary"
    assert resumed.batches == total
    full = _loader(faulty, tokenizer, workers=workers)
    _ = [b for _, b in zip(range(total), full)]
    assert resumed.skips.counts == full.skips.counts  # skips are neither lost nor counted twice


def test_resume_with_other_workers_starts_the_next_epoch(faulty, tokenizer, caplog):
    loader = _loader(faulty, tokenizer, workers=2)
    _ = [b for _, b in zip(range(3), loader)]
    other = _loader(faulty, tokenizer, workers=0)
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(loader.state_dict())
    assert "workers=2 (now 1)" in caplog.text
    assert next(iter(other)).epochs[0] == 1


def _bad_shards(folder, count=3):
    samples = ({"__key__": f"b{i}", "jpg": b"not an image", "txt": "caption"} for i in range(count * 4))
    write_shards(samples, folder, 4, total=count * 4)
    return [str(folder / f"{i}.tar") for i in range(count)]


@pytest.mark.parametrize("workers", [0, 2])
def test_entirely_unreadable_data_stops_with_data_error(tmp_path, tokenizer, workers):
    shards = _bad_shards(tmp_path)
    loader = build_train_loader(DataConfig(workers=workers), shards, image_size=IMAGE_SIZE, tokenizer=tokenizer,
                                batch_size=2, rank=0, world_size=1, seed=0)
    started = time.perf_counter()
    with pytest.raises(DataError, match="entirely unreadable"):
        next(iter(loader))
    assert time.perf_counter() - started < 20


def test_too_few_shards_for_the_ranks(tmp_path, tokenizer):
    shards = _bad_shards(tmp_path, count=1)
    with pytest.raises(DataError, match="cannot feed 2 ranks"):
        build_train_loader(DataConfig(), shards, image_size=IMAGE_SIZE, tokenizer=tokenizer, batch_size=2,
                           rank=1, world_size=2, seed=0)


def test_stalled_workers_time_out(faulty, tokenizer, monkeypatch):
    def stalled(*args, **kwargs):  # storage that answers only after the loader's timeout
        time.sleep(3)
        raise OSError("stalled storage")
        yield
    monkeypatch.setattr(wds, "_raw_samples", stalled)  # forked workers inherit the patch
    loader = _loader(faulty, tokenizer, workers=2, timeout_s=1.0)
    started = time.perf_counter()
    with pytest.raises(DataError, match="data.timeout_s"):
        next(iter(loader))
    assert time.perf_counter() - started < 10  # the timeout, then the stalled workers are stopped


def test_eval_batches_every_good_sample_once_in_order(faulty):
    skips = SkipCounter()
    batches = list(iter_eval_batches(faulty.shards, image_size=IMAGE_SIZE, batch_size=7, skips=skips))
    keys = [key for _, _, _, batch_keys in batches for key in batch_keys]
    assert sorted(keys) == keys and set(keys) == faulty.good_keys and len(keys) == 30
    assert [len(b[3]) for b in batches] == [7, 7, 7, 7, 2]
    assert skips.nonzero() == faulty.expected_skips
    images, labels, captions, batch_keys = batches[0]
    assert images.shape == (7, 3, IMAGE_SIZE, IMAGE_SIZE) and labels.dtype == torch.int64
    assert labels.tolist() == [faulty.labels[k] for k in batch_keys]
    assert captions[0].startswith("a test photo number")
    again = next(iter_eval_batches(faulty.shards, image_size=IMAGE_SIZE, batch_size=7))
    assert torch.equal(again[0], images)  # deterministic


def test_eval_set_without_captions(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(buffer, format="PNG")
    write_shards(iter([{"__key__": "x", "png": buffer.getvalue(), "cls": "3"}]), tmp_path, 10)
    images, labels, captions, keys = next(iter_eval_batches([str(tmp_path / "0.tar")], image_size=16, batch_size=4))
    assert images.shape == (1, 3, 16, 16) and labels.tolist() == [3] and captions == [""] and keys == ["x"]


def test_a_run_on_other_ranks_starts_the_next_epoch_with_the_skip_counts(faulty, tokenizer, caplog):
    """Saved by 2 ranks, resumed on 3: every rank starts the epoch after the newest an old rank was
    in, and the old ranks' skip counts are carried once (their sum over the new ranks is the old sum)."""
    old = [_loader(faulty, tokenizer, rank=r, world_size=2, workers=2, batch_size=2) for r in (0, 1)]
    for loader in old:
        _ = [b for _, b in zip(range(4), loader)]
    states = [json.loads(json.dumps(loader.state_dict())) for loader in old]
    newest = max(p[0] for state in states for p in state["positions"])
    new = [_loader(faulty, tokenizer, rank=r, world_size=3, workers=2, batch_size=2) for r in range(3)]
    with caplog.at_level(logging.WARNING):
        for loader in new:
            loader.load_other_world_states(states, samples_seen=16)
    assert "written by 2 rank(s), this run has 3" in caplog.text
    total = {reason: sum(s["skips"][reason] for s in states) for reason in states[0]["skips"]}
    assert sum(total.values()) > 0  # the faulty shards were met, so the check below can fail
    assert {reason: sum(loader.skips.counts[reason] for loader in new) for reason in total} == total
    assert all(loader.positions == [(newest + 1, 0)] * 2 for loader in new)
    assert all(next(iter(loader)).epochs[0] == newest + 1 for loader in new)
