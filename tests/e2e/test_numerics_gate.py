"""The numerics gate: the tiny preset's 20-step loss curves stay within 1e-5 of the golden file.

A change that means to alter the numbers says so in its commit and rewrites the file with
`python tools/numerics_gate.py --update`.
"""
import json
import sys

import pytest

from megapgs.config import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tools"))
import numerics_gate  # noqa: E402


def test_the_golden_file_holds_both_curves():
    golden = json.loads(numerics_gate.GOLDEN.read_text())
    assert golden["steps"] == numerics_gate.STEPS
    for name in numerics_gate.RUNS:
        assert len(golden[name]) == numerics_gate.STEPS
    assert golden["pgs"] != golden["unmasked"]  # masking changes the curve
    assert golden["unmasked"][-1] < golden["unmasked"][0]  # it trains


def test_the_comparison_catches_a_drift():
    golden = {"pgs": [4.0, 3.0]}
    assert numerics_gate.compare(golden, {"pgs": [4.0, 3.0 * (1 + 5e-6)]}) == []
    (problem,) = numerics_gate.compare(golden, {"pgs": [4.0, 3.0 * (1 + 2e-5)]})
    assert problem.startswith("pgs step 2:")


@pytest.mark.parametrize("name", sorted(numerics_gate.RUNS))
def test_loss_curve_matches_the_golden_file(tmp_path, name):
    golden = json.loads(numerics_gate.GOLDEN.read_text())
    curve = numerics_gate.loss_curve(name, tmp_path)
    assert numerics_gate.compare({name: golden[name]}, {name: curve}) == []
