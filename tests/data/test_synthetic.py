"""Synthetic data: keyed per sample, so every split of a step's global batch sees the same samples."""
import math

import torch

from megapgs.data.synthetic import build_synthetic_loader
from megapgs.models.text import eot_lengths


def take(loader, count):
    return [batch for _, batch in zip(range(count), loader)]


def test_synthetic_batches_are_shaped_like_the_loaders():
    loader = build_synthetic_loader(batch_size=5, image_size=32, context_length=16, device="cpu", seed=0)
    state = torch.random.get_rng_state()
    batches = take(loader, 6)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    batch = batches[0]
    assert batch.images.shape == (5, 3, 32, 32) and batch.tokens.shape == (5, 16)
    assert batch.tokens.dtype == torch.int64 and batch.images.dtype == torch.float32
    assert batch.text_lengths == eot_lengths(batch.tokens).tolist() and min(batch.text_lengths) >= 4
    assert (batch.tokens[:, 0] == 49406).all() and (batch.tokens < 49408).all()
    assert abs(float(batch.images.mean())) < 0.05 and abs(float(batch.images.std()) - 1) < 0.05  # N(0, 1)
    assert not torch.equal(batches[1].images, batches[0].images)
    assert loader.state_dict()["batches"] == 6 and loader.skips.total == 0


def test_samples_repeat_after_the_distinct_count():
    loader = build_synthetic_loader(batch_size=4, image_size=8, context_length=8, device="cpu", distinct_samples=12)
    batches = take(loader, 4)
    assert torch.equal(batches[3].images, batches[0].images) and torch.equal(batches[3].tokens, batches[0].tokens)


def test_every_split_of_the_global_batch_sees_the_same_samples():
    """1 rank x 8 rows, 2 ranks x 4, and 1 rank x 2 micro-batches of 4 hold the same 8 samples."""
    common = dict(image_size=8, context_length=12, device="cpu", seed=3, distinct_samples=32)
    (whole,) = take(build_synthetic_loader(batch_size=8, **common), 1)
    halves = [take(build_synthetic_loader(batch_size=4, rank=r, world_size=2, **common), 1)[0] for r in (0, 1)]
    micro = take(build_synthetic_loader(batch_size=4, **common), 2)
    for parts in (halves, micro):
        assert torch.equal(torch.cat([p.images for p in parts]), whole.images)
        assert torch.equal(torch.cat([p.tokens for p in parts]), whole.tokens)
        assert sum((p.text_lengths for p in parts), []) == whole.text_lengths
        assert sum((p.keys for p in parts), []) == whole.keys


def test_resume_continues_the_stream():
    loader = build_synthetic_loader(batch_size=3, image_size=8, context_length=8, device="cpu")
    take(loader, 2)
    state = loader.state_dict()
    expected = take(loader, 1)[0]
    again = build_synthetic_loader(batch_size=3, image_size=8, context_length=8, device="cpu")
    again.load_state_dict(state)
    assert torch.equal(take(again, 1)[0].images, expected.images)
    assert math.isfinite(float(expected.images.abs().max()))


def test_a_run_on_other_ranks_continues_at_the_next_global_sample():
    """2 ranks x 4 rows, 3 global micro-batches, then 4 ranks x 2 rows: the next 8 samples are the
    ones the 2-rank run would have read next, dealt over 4 ranks."""
    common = dict(image_size=8, context_length=8, device="cpu", seed=1, distinct_samples=64)
    old = [build_synthetic_loader(batch_size=4, rank=r, world_size=2, **common) for r in (0, 1)]
    for loader in old:
        take(loader, 3)
    states = [loader.state_dict() for loader in old]
    expected = [take(loader, 1)[0] for loader in old]
    new = [build_synthetic_loader(batch_size=2, rank=r, world_size=4, **common) for r in range(4)]
    for loader in new:
        loader.load_other_world_states(states, samples_seen=3 * 8)
    got = [take(loader, 1)[0] for loader in new]
    assert sum((b.keys for b in got), []) == sum((b.keys for b in expected), [])
    assert torch.equal(torch.cat([b.images for b in got]), torch.cat([b.images for b in expected]))
