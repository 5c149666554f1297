"""A checkpoint written by 2 ranks under ZeRO-3 resumes on 1 and on 4 ranks (megapgs/train/reshard.py):
through DeepSpeed's Universal Checkpoint, the loss curve goes on as the 2-rank run's did, on the same
samples, and the conversion is kept for the next resume."""
import json
import shutil
import sys

import pytest

from megapgs.exit_codes import RESUME_REFUSED
from megapgs.train.reshard import CONVERTED, UNIVERSAL
from tests.e2e.test_train import SYNTHETIC, run, train_cmd, train_records
from tests.e2e.runs import run as run_any, words

STEPS, SAVED_AT = 10, 5
ZERO3 = [*SYNTHETIC, "--set", f"train.steps={STEPS}", "--set", "train.checkpoint_every=5", "--set", "train.keep_last=5",
         "--set", 'deepspeed={"zero_optimization": {"stage": 3}}']


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two_ranks")
    run(train_cmd(run_dir, *ZERO3, "--set", "train.micro_batch_size=16", ranks=2, port=29731))
    return run_dir


def checkpoint_copy(two_rank_run, run_dir):
    """A new output directory holding only the 2-rank run's checkpoint of step 5."""
    tag = f"step_{SAVED_AT:08d}"
    shutil.copytree(two_rank_run / "checkpoints" / tag, run_dir / "checkpoints" / tag)
    return run_dir / "checkpoints" / tag


@pytest.mark.multiprocess
@pytest.mark.parametrize("ranks", [1, 4])
def test_a_two_rank_zero3_checkpoint_continues_on_other_world_sizes(tmp_path, two_rank_run, ranks):
    checkpoint = checkpoint_copy(two_rank_run, tmp_path)
    converted_ahead = ranks == 4  # by tools/convert_to_universal.py; the 1-rank run converts it itself
    if converted_ahead:
        tool = run_any([sys.executable, "tools/convert_to_universal.py", str(checkpoint)])
        assert f"universal checkpoint: {checkpoint / UNIVERSAL}" in tool.stdout
    result = run(train_cmd(tmp_path, *ZERO3, "--set", f"train.micro_batch_size={32 // ranks}", "--resume", "auto",
                           ranks=ranks, port=29732 + ranks))
    said = words(result)
    assert f"written by 2 rank(s), this run has {ranks}" in said
    assert f"trained {STEPS - SAVED_AT} steps (to step {STEPS}" in said
    assert (checkpoint / UNIVERSAL / CONVERTED).is_file()  # kept for a later resume
    assert ("to a DeepSpeed Universal Checkpoint" in said) != converted_ahead
    expected, resumed = train_records(two_rank_run), train_records(tmp_path)
    assert sorted(resumed) == list(range(SAVED_AT + 1, STEPS + 1))
    assert resumed[STEPS]["loss"] < expected[1]["loss"]  # it trains
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-4), step
        assert resumed[step]["lr"] == expected[step]["lr"], step
        assert resumed[step]["samples_seen"] == expected[step]["samples_seen"], step
        assert resumed[step]["samples_checksum"] == expected[step]["samples_checksum"], step  # the same samples
    marker = json.loads((tmp_path / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").read_text())
    assert marker["world_size"] == ranks and marker["samples_seen"] == STEPS * 32


@pytest.mark.multiprocess
def test_a_checkpoint_missing_a_rank_file_is_refused_with_its_name(tmp_path, two_rank_run):
    checkpoint = checkpoint_copy(two_rank_run, tmp_path)
    (checkpoint / "megapgs_rank1.pt").unlink()
    result = run_any(train_cmd(tmp_path, *ZERO3, "--set", "train.micro_batch_size=32", "--resume", "auto"), ok=False)
    assert result.returncode == RESUME_REFUSED, result.stdout[-3000:] + result.stderr[-3000:]
    assert "is missing: the checkpoint holds no data position of its rank 1" in words(result)
    assert "Traceback" not in result.stdout + result.stderr
