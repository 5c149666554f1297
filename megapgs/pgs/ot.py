"""Optimal-transport balancing of a batch of patch-similarity matrices (PGS.md step 4).

Both functions take S (B, L, L) and return the term that PGS adds to S: S̃ = S + result.
They run a fixed number of iterations with no convergence check, so they never wait on
the host.
"""
from __future__ import annotations

import math

import torch


def entropic_plan(cost: torch.Tensor, reg: float, iters: int) -> torch.Tensor:
    """Entropic OT plan T (B, n, m) between uniform marginals for `cost` (B, n, m).

    T minimises <T, M> - reg·H(T) subject to T 1 = 1/n and Tᵀ 1 = 1/m. Log-domain Sinkhorn
    (every kernel product is a logsumexp, so reg = 0.05 on costs in [0, 2] is stable in
    float32), `iters` iterations. The update order is POT's `ot.sinkhorn`: start from
    u = 1/n, update v then u, so after any iteration count the result equals POT's iterate
    and the row marginals are exact.
    """
    batch, n, m = cost.shape
    log_kernel = cost / -reg                                   # (B, n, m)
    log_a, log_b = -math.log(n), -math.log(m)                  # uniform marginals
    log_u = cost.new_full((batch, n), log_a)                   # log of POT's u = 1/n
    log_v = cost.new_zeros((batch, m))
    for _ in range(iters):
        # v = b / (Kᵀ u), then u = a / (K v), each in log space.
        log_v = log_b - torch.logsumexp(log_kernel + log_u[:, :, None], dim=1)   # (B, m)
        log_u = log_a - torch.logsumexp(log_kernel + log_v[:, None, :], dim=2)   # (B, n)
    return torch.exp(log_u[:, :, None] + log_kernel + log_v[:, None, :])       # (B, n, m)


def _kernel_sum(kernel: torch.Tensor, weights: torch.Tensor, dim: int) -> torch.Tensor:
    """sum over `dim` (1 or 2) of kernel (B, n, m) times weights broadcast along it: (B, m) or (B, n).
    Batched matrix-vector products; small CPU problems are faster as multiply-and-sum."""
    if kernel.device.type == "cpu" and kernel.shape[1] * kernel.shape[2] <= 4096:
        return (kernel * weights.unsqueeze(3 - dim)).sum(dim)
    if dim == 1:
        return torch.bmm(weights[:, None, :], kernel)[:, 0]
    return torch.bmm(kernel, weights[:, :, None])[:, :, 0]


def entropic_plan_scaled(cost: torch.Tensor, reg: float, iters: int) -> torch.Tensor:
    """`entropic_plan` with the kernel products as matrix-vector products (several times faster).

    The log-domain potentials are kept, and each logsumexp_j(-M_ij/reg + log v_j) is computed
    as s + log(sum_j K_ij exp(log v_j - s)), s = max_j log v_j. Every sum has a term
    K_ij* >= exp(-max(M)/reg), so nothing underflows as long as that is a normal number of
    the dtype: callers check `scaled_sinkhorn_safe` first.
    """
    batch, n, m = cost.shape
    kernel = torch.exp(cost / -reg)                             # (B, n, m)
    log_a, log_b = -math.log(n), -math.log(m)
    log_u = cost.new_full((batch, n), log_a)
    log_v = cost.new_zeros((batch, m))
    for _ in range(iters):
        shift = log_u.amax(dim=1, keepdim=True)
        log_v = log_b - shift - _kernel_sum(kernel, (log_u - shift).exp(), dim=1).log()   # (B, m)
        shift = log_v.amax(dim=1, keepdim=True)
        log_u = log_a - shift - _kernel_sum(kernel, (log_v - shift).exp(), dim=2).log()   # (B, n)
    return log_u.exp()[:, :, None] * kernel * log_v.exp()[:, None, :]


def scaled_sinkhorn_safe(max_cost: float, reg: float, dtype: torch.dtype) -> bool:
    """Whether exp(-max_cost/reg) is a normal number of `dtype`, with 4 orders to spare."""
    return max_cost / reg < -math.log(torch.finfo(dtype).tiny) - math.log(1e4)


def entropic_balance(similarity: torch.Tensor, reg: float, iters: int) -> torch.Tensor:
    """L·T for cost 1 - S (S a cosine similarity, so the cost lies in [0, 2]): the plan
    rescaled so that its rows and columns sum to 1. Uses the matrix-vector form when the
    kernel cannot underflow (reg >= 0.024 in float32), the logsumexp form otherwise; both
    compute the same iterates."""
    num_patches = similarity.shape[-1]
    cost = 1 - similarity
    if scaled_sinkhorn_safe(2.0, reg, similarity.dtype):
        return num_patches * entropic_plan_scaled(cost, reg, iters)
    return num_patches * entropic_plan(cost, reg, iters)


def reference_balance(similarity: torch.Tensor, iters: int) -> torch.Tensor:
    """The released code's balancing: alternately divide S by its row sums and its column
    sums (each + 1e-3), `iters` times. Kept as published, including that cosine similarities
    can be negative, so a sum near -1e-3 blows up; use `entropic_balance` for new runs."""
    balanced = similarity
    for _ in range(iters):
        balanced = balanced / (balanced.sum(dim=2, keepdim=True) + 1e-3)   # rows
        balanced = balanced / (balanced.sum(dim=1, keepdim=True) + 1e-3)   # columns
    return balanced
