"""Per-sample keyed draws: uniform, reproducible, and independent of how a batch is split."""
import numpy as np
import torch
from scipy.stats import chisquare

from megapgs.config import PGSConfig
from megapgs.pgs.keyed_random import SampleKeyedDraws, _mul32, hash32
from megapgs.pgs.selection import select_patches


def test_mul32_is_multiplication_mod_2_to_the_32():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2**32, 1000, dtype=np.int64)
    for constant in (0x7FEB352D, 0x846CA68B, 1, 0xFFFFFFFF):
        ours = _mul32(torch.from_numpy(values), constant).numpy()
        expected = [(int(v) * constant) % 2**32 for v in values]
        assert ours.tolist() == expected
    assert hash32(torch.tensor([0, 1, 2])).unique().numel() == 3


def test_draws_are_uniform_and_keyed():
    draws = SampleKeyedDraws(seed=3, step=5, first_sample=0).uniform(512, 64, 0, "cpu")
    assert draws.min() >= 0 and draws.max() < 1
    counts = torch.histc(draws, bins=16, min=0, max=1).numpy()
    assert chisquare(counts).pvalue > 0.01
    assert torch.equal(draws, SampleKeyedDraws(3, 5, 0).uniform(512, 64, 0, "cpu"))
    for other in (SampleKeyedDraws(4, 5, 0), SampleKeyedDraws(3, 6, 0)):
        assert not torch.equal(draws, other.uniform(512, 64, 0, "cpu"))
    assert not torch.equal(draws, SampleKeyedDraws(3, 5, 0).uniform(512, 64, 1, "cpu"))
    # rows are samples: the draws of samples 100.. do not depend on where the batch starts
    torch.testing.assert_close(SampleKeyedDraws(3, 5, 100).uniform(8, 64, 0, "cpu"), draws[100:108], rtol=0, atol=0)


def test_a_split_batch_draws_the_same_masks():
    """Rank 1 of 2 (samples 4..7) keeps exactly what one rank holding all 8 keeps for them."""
    gen = torch.Generator().manual_seed(0)
    images, tokens = torch.randn(8, 3, 28, 28, generator=gen), torch.randn(8, 49, 16, generator=gen)
    whole = select_patches(images, tokens, 4, PGSConfig(), 0.3, SampleKeyedDraws(0, 9, 0))
    half = select_patches(images[4:], tokens[4:], 4, PGSConfig(), 0.3, SampleKeyedDraws(0, 9, 4))
    assert torch.equal(whole.kept_idx[4:], half.kept_idx)
    assert torch.equal(whole.counts[4:], half.counts)
