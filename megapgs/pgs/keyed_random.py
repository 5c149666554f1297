"""Uniform draws keyed by (seed, step, global sample index): masks that do not depend on how the
global batch is split over ranks.

`pgs_generator` (one torch.Generator per seed, step and rank) is the default source of PGS's
randomness; with it, a sample's mask depends on its rank and its row. `SampleKeyedDraws` gives
each sample its own stream instead, computed by a counter-based integer hash on the device (no
generator state, no Python loop over images), so 1 rank x 32 samples and 2 ranks x 16 draw the
same masks for the same samples: the check of rank invariance with PGS on (`pgs.rng: sample`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for x in [0, 2^32), without leaving int64's range."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (the "lowbias32" finaliser) of int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


@dataclass(frozen=True)
class SampleKeyedDraws:
    """Uniform [0, 1) draws for the samples first_sample .. first_sample + B - 1 of one step."""
    seed: int
    step: int
    first_sample: int

    def bits(self, batch: int, count: int, stream: int, device: torch.device | str) -> torch.Tensor:
        """(batch, count) int64 of 32 random bits each, the same on every device; `stream`
        separates the different draws of one step (candidates, keep order)."""
        key = torch.full((1,), self.seed & _MASK32, dtype=torch.int64, device=device)  # a fill, not a copy
        for part in (self.step, stream):
            key = hash32(key ^ (part & _MASK32))
        samples = torch.arange(self.first_sample, self.first_sample + batch, dtype=torch.int64, device=device)
        per_sample = hash32(key ^ (samples & _MASK32))                                        # (B,)
        slots = hash32(torch.arange(count, dtype=torch.int64, device=device) + 0x9E3779B9 & _MASK32)
        return hash32(hash32(per_sample[:, None] ^ slots[None, :]))                            # (B, count)

    def uniform(self, batch: int, count: int, stream: int, device: torch.device | str) -> torch.Tensor:
        """(batch, count) float32 in [0, 1) with 24 random bits each."""
        return (self.bits(batch, count, stream, device) >> 8).to(torch.float32) * (1.0 / (1 << 24))


def uniform(source: torch.Generator | SampleKeyedDraws, batch: int, count: int, stream: int,
            device: torch.device | str) -> torch.Tensor:
    """(batch, count) uniform draws from either source of PGS's randomness."""
    if isinstance(source, SampleKeyedDraws):
        return source.uniform(batch, count, stream, device)
    return torch.rand(batch, count, generator=source, device=device)
