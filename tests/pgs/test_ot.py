"""PGS step 4: our batched Sinkhorn against POT, the library of the field."""
import numpy as np
import ot
import ot.batch
import pytest
import torch
import torch.nn.functional as F

from megapgs.pgs.ot import (entropic_balance, entropic_plan, entropic_plan_scaled, reference_balance,
                            scaled_sinkhorn_safe)

REG = 0.05


def cosine_matrices(batch: int, num_patches: int, dtype=torch.float64, seed: int = 0,
                    shared: float = 0.5) -> torch.Tensor:
    """(B, L, L) similarity matrices like PGS's: cosines of features with a common part
    (`shared` > 0 makes off-diagonal similarities large and Sinkhorn slow to converge)."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, num_patches, 32, generator=gen, dtype=dtype)
    feats = feats + shared * torch.randn(batch, 1, 32, generator=gen, dtype=dtype)
    feats = F.normalize(feats, dim=2)
    return feats @ feats.transpose(1, 2)


def max_rel(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.max(np.abs(ours - theirs) / np.abs(theirs)))


@pytest.mark.parametrize("num_patches", [49, 196, 256])
@pytest.mark.parametrize("plan_fn", [entropic_plan, entropic_plan_scaled], ids=["log", "scaled"])
def test_iterates_equal_pot_sinkhorn(num_patches, plan_fn):
    """At the configured fixed iteration count (50), each matrix's plan is POT's ot.sinkhorn
    iterate (stopThr=0: POT also runs all 50 iterations)."""
    sim = cosine_matrices(3, num_patches)
    ours = plan_fn(1 - sim, REG, 50).numpy()
    uniform = np.full(num_patches, 1.0 / num_patches)
    for i in range(sim.shape[0]):
        theirs = ot.sinkhorn(uniform, uniform, (1 - sim[i]).numpy(), REG, numItermax=50, stopThr=0.0, warn=False)
        assert max_rel(ours[i], theirs) <= 1e-4


@pytest.mark.parametrize("num_patches", [49, 196, 256])
@pytest.mark.parametrize("symmetric", [True, False])
def test_batch_iterates_equal_pot_batch(num_patches, symmetric):
    """ot.batch's log-Sinkhorn updates the row potential first, ours (like ot.sinkhorn) the
    column one; one order on M is the other on M^T, so POT's plan for M^T, transposed, is our
    plan for M after the same 50 iterations. (Comparing converged plans instead is ill-posed
    here: with reg = 0.05 the plans are near-diagonal and their 1e-12-sized off-diagonal
    entries converge far more slowly than the marginals.)"""
    cost = 1 - cosine_matrices(4, num_patches, seed=1)
    if not symmetric:
        cost = cost + 0.1 * torch.rand(cost.shape, generator=torch.Generator().manual_seed(2), dtype=cost.dtype)
    ours = entropic_plan(cost, REG, 50).numpy()
    result = ot.batch.solve_batch(cost.mT.contiguous(), REG, max_iter=50, tol=0.0, method="log_sinkhorn")
    assert result.log["n_iter"] == 49  # POT's 0-based count of the 50 iterations it ran
    assert max_rel(ours, result.plan.numpy().transpose(0, 2, 1)) <= 1e-4


def test_balance_has_unit_rows_and_columns():
    sim = cosine_matrices(2, 49, dtype=torch.float32)
    balanced = entropic_balance(sim, REG, 200)
    assert torch.allclose(balanced.sum(dim=2), torch.ones(2, 49), atol=1e-4)
    assert torch.allclose(balanced.sum(dim=1), torch.ones(2, 49), atol=1e-4)


def test_float32_scaled_form_matches_float64_log_form():
    sim = cosine_matrices(8, 256)
    exact = entropic_plan(1 - sim, REG, 50)
    fast = entropic_plan_scaled(1 - sim.float(), REG, 50).double()
    assert float(((fast - exact).abs() / exact).max()) <= 1e-3


def test_small_regularisation_takes_the_log_form_and_stays_finite():
    assert scaled_sinkhorn_safe(2.0, 0.05, torch.float32)
    assert not scaled_sinkhorn_safe(2.0, 0.01, torch.float32)  # exp(-200) underflows float32
    sim = cosine_matrices(2, 49, dtype=torch.float32)
    balanced = entropic_balance(sim, 0.01, 50)
    assert torch.isfinite(balanced).all()
    expected = 49 * entropic_plan(1 - sim.double(), 0.01, 50)
    assert torch.allclose(balanced.double(), expected, atol=1e-5)


def test_reference_balance_is_the_released_loop():
    """The released code, one matrix at a time: S / (row sums + 1e-3), then / (col sums + 1e-3)."""
    sim = cosine_matrices(3, 49).abs()
    ours = reference_balance(sim, 50)
    for i in range(3):
        expected = sim[i].numpy()
        for _ in range(50):
            expected = expected / (expected.sum(axis=1, keepdims=True) + 1e-3)
            expected = expected / (expected.sum(axis=0, keepdims=True) + 1e-3)
        np.testing.assert_allclose(ours[i].numpy(), expected, rtol=1e-12)
