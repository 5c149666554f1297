"""The static token budget: a packed stream whose length the host knows before the device has
counted anything, with padding segments that change no sequence's output or gradient."""
import pytest
import torch

from megapgs.config import PGSConfig
from megapgs.models.archs import get_arch
from megapgs.models.clip import CLIP
from megapgs.packed import Packed
from megapgs.pgs.pack import PatchMasker
from megapgs.pgs.selection import pgs_generator, select_patches


@pytest.mark.parametrize("batch, low, high", [(1, 1, 1), (4, 6, 35), (16, 27, 180), (7, 35, 35), (3, 2, 3)])
def test_the_budget_holds_every_length_combination(batch, low, high):
    total, pads = Packed.budget_for(batch, low, high)
    gen = torch.Generator().manual_seed(batch)
    cases = [torch.full((batch,), low), torch.full((batch,), high),
             torch.randint(low, high + 1, (batch,), generator=gen)]
    for lengths in cases:
        packed = Packed.with_budget(lengths, low, high)
        segments = packed.segment_lengths()
        assert packed.total_tokens == total and int(packed.cu_seqlens[-1]) == total
        assert packed.num_seqs == batch and packed.num_segments == batch + pads
        assert torch.equal(packed.lengths().long(), lengths)
        assert int(segments.min()) >= 1 and int(segments.max()) <= packed.max_seqlen == high
    assert total - batch * high == pads <= batch  # padding is at most one segment per sequence


def test_first_and_last_rows_are_the_sequences_own():
    packed = Packed.with_budget(torch.tensor([3, 1, 2]), 1, 3)
    assert packed.first_rows().tolist() == [0, 3, 4] and packed.last_rows().tolist() == [2, 3, 5]
    assert packed.seq_ids()[:6].tolist() == [0, 0, 0, 1, 2, 2] and int(packed.seq_ids()[6:].min()) >= 3
    assert not packed.is_uniform


def test_static_and_exact_selection_keep_the_same_patches():
    gen = torch.Generator().manual_seed(0)
    images, tokens = torch.randn(6, 3, 28, 28, generator=gen), torch.randn(6, 49, 16, generator=gen)
    exact, static = (select_patches(images, tokens, 4, PGSConfig(), 0.3, pgs_generator(0, 1, 0), static=s)
                     for s in (False, True))
    assert torch.equal(exact.kept_idx, static.kept_idx) and torch.equal(exact.counts, static.counts)
    assert torch.equal(exact.packed.lengths(), static.packed.lengths())
    assert static.packed.total_tokens == Packed.budget_for(6, 6, 35)[0] > exact.packed.total_tokens
    assert static.packed.host_lengths is None  # nothing was read back


@pytest.mark.parametrize("backend", ["sdpa_padded", "reference", "flex"])
def test_padding_changes_no_output_and_no_gradient(backend):
    """The image tower on the budgeted stream equals the exact one, outputs and parameter gradients."""
    torch.manual_seed(0)
    model = CLIP(get_arch("tiny-28"))
    model.set_attention(backend)
    images = torch.randn(5, 3, 28, 28)
    cfg = PGSConfig(min_mask_ratio=0.3)
    results = {}
    for static in (False, True):
        model.zero_grad()
        masker = PatchMasker(cfg, 4, 0.5, pgs_generator(0, 3, 0), static=static)
        if backend == "flex":  # FlexAttention has no backward on the CPU
            with torch.no_grad():
                results[static] = (model.encode_image(images, masker), [])
            continue
        features = model.encode_image(images, masker)
        features.square().sum().backward()
        results[static] = (features.detach(), [p.grad.clone() for p in model.visual.parameters()])
    (exact, exact_grads), (static, static_grads) = results[False], results[True]
    torch.testing.assert_close(static, exact, rtol=1e-5, atol=1e-6)
    for got, want in zip(static_grads, exact_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
