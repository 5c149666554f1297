import math

import pytest

from megapgs.config import OptimConfig, PGSConfig
from megapgs.train.schedule import lr_at, masking_at, progress_at


def test_warmup_then_cosine_to_the_floor():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx(1e-4 + 0.9e-3 * 0.5)       # half way down the cosine
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)
    values = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_constant_and_no_warmup():
    cfg = OptimConfig(lr=5e-4, warmup_steps=0, schedule="constant")
    assert {lr_at(s, cfg, 50) for s in range(50)} == {5e-4}
    cosine = OptimConfig(lr=5e-4, warmup_steps=0)
    assert lr_at(0, cosine, 50) == pytest.approx(5e-4)
    assert lr_at(25, cosine, 50) == pytest.approx(5e-4 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_progress_is_the_completed_share():
    assert progress_at(0, 100) == 0.0 and progress_at(50, 100) == 0.5 and progress_at(100, 100) == 1.0
    assert progress_at(150, 100) == 1.0


def test_unmasked_tail_turns_masking_off_for_the_last_steps():
    cfg = PGSConfig(unmasked_tail=0.25)
    assert [masking_at(s, 8, cfg) for s in range(8)] == [True] * 6 + [False] * 2
    assert not any(masking_at(s, 8, PGSConfig(masking="none")) for s in range(8))
    assert all(masking_at(s, 8, PGSConfig()) for s in range(8))
