"""How many patch tokens an image keeps: the bounds of PGS.md step 5."""
from __future__ import annotations

import math


def keep_bounds(num_patches: int, min_mask_ratio: float, min_keep_ratio: float) -> tuple[int, int]:
    """(k_min, k_max): k_max = floor(L (1 - r_min)) patches at most, k_min = ceil(min_keep_ratio L)
    at least (never more than k_max). The 1e-9 guards the float products of ratios like 0.3."""
    k_max = math.floor(num_patches * (1 - min_mask_ratio) + 1e-9)
    k_min = min(k_max, math.ceil(num_patches * min_keep_ratio - 1e-9))
    return max(k_min, 1), max(k_max, 1)
