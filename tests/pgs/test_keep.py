import math

import pytest

from megapgs.pgs.keep import keep_bounds


@pytest.mark.parametrize("num_patches,r_min,keep,expected", [
    (256, 0.3, 0.1, (26, 179)),   # ViT-L/14 at 224 px, CLIP-PGS-0.3
    (256, 0.5, 0.1, (26, 128)),   # CLIP-PGS-0.5
    (196, 0.3, 0.1, (20, 137)),   # ViT-B/16
    (49, 0.3, 0.1, (5, 34)),      # tiny-28
    (49, 0.0, 1.0, (49, 49)),     # no masking
    (16, 0.9, 0.1, (1, 1)),       # k_min capped by k_max, never 0
])
def test_keep_bounds(num_patches, r_min, keep, expected):
    assert keep_bounds(num_patches, r_min, keep) == expected


def test_bounds_hold_on_a_grid_of_ratios():
    for num_patches in (16, 49, 196, 256):
        for r_min in [i / 20 for i in range(20)]:
            for keep in [j / 20 for j in range(1, 21)]:
                k_min, k_max = keep_bounds(num_patches, r_min, keep)
                assert 1 <= k_min <= k_max <= num_patches
                assert k_max <= num_patches * (1 - r_min) + 1e-6 or k_max == 1
                assert k_min == k_max or k_min >= math.ceil(keep * num_patches - 1e-6)
