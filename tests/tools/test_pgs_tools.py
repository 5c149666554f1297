"""The PGS tools run end to end on the CPU (small sizes), so they do not rot between GPU sessions."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megapgs.perf.timers import median_ms

ROOT = Path(__file__).resolve().parents[2]


def run_tool(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_visualize_pgs_draws_the_grid(tmp_path):
    out = tmp_path / "grid.png"
    stdout = run_tool("tools/visualize_pgs.py", "--out", str(out), "--photos", "astronaut", "rocket",
                      "--size", "64", "--patch", "8")
    assert "64 patches per photo" in stdout
    image = np.asarray(Image.open(out))
    assert image.shape == (22 + 2 * (64 + 18 + 6) + 6, 5 * 64 + 6 * 6, 3)
    original = image[22:86, 6:70].astype(int)
    random_masked = image[22:86, 76:140].astype(int)
    same = (np.abs(original - random_masked).sum(axis=2) == 0).reshape(8, 8, 8, 8).all(axis=(1, 3))
    assert 0 < same.sum() < 64  # some patches kept as they are, the others greyed


def test_bench_pgs_prints_every_variant():
    stdout = run_tool("tools/bench_pgs.py", "--device", "cpu", "--preset", "tiny", "--batch", "8", "--repeats", "1")
    for variant in ("none", "random", "pgs", "pgs-no-ot", "pgs-0.5", "pgs-exact", "pgs-static"):
        assert f"{variant}:" in stdout
    assert stdout.count("% of the step") == 6


def test_median_ms_rejects_no_repeats():
    with pytest.raises(ValueError):
        median_ms(lambda: None, torch.device("cpu"), 0)
