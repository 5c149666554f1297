"""Preemption: SIGTERM or SIGUSR1 stops a run after its current step with a checkpoint and exit code 3,
on every rank at the same step (one rank signalled is enough), and `--resume auto` continues it as if
it had never stopped."""
import os
import signal
import subprocess
import time

import pytest

from megapgs.config import REPO_ROOT
from megapgs.train.preempt import PREEMPTED_EXIT
from tests.e2e.test_train import SYNTHETIC, run, train_cmd, train_records

STEPS = 30
COMMON = [*SYNTHETIC, "--set", f"train.steps={STEPS}", "--set", "train.checkpoint_every=0", "--set", "train.micro_batch_size=32",
          "--set", "pgs.masking=pgs", "--set", "pgs.rng=sample"]


def start_and_signal(cmd: list[str], run_dir, sig: int, at_step: int, pick_process) -> subprocess.CompletedProcess:
    """Start the run, send `sig` to the process `pick_process(launcher pid)` once step `at_step` is logged."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and f'"step": {at_step},' in metrics.read_text():
            os.kill(pick_process(proc.pid), sig)
            break
        time.sleep(0.02)
    output, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, output, "")


def stopped_step(run_dir) -> int:
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / tag / "COMPLETE").is_file()
    return int(tag.removeprefix("step_"))


def assert_continues_the_straight_run(straight, stopped, at: int) -> None:
    expected, resumed = train_records(straight), train_records(stopped)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(at + 1, STEPS + 1):
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5, abs=1e-6), step
        assert resumed[step]["samples_checksum"] == expected[step]["samples_checksum"], step
        assert resumed[step]["mask_checksum"] == expected[step]["mask_checksum"], step


def test_sigterm_stops_one_rank_with_a_checkpoint_and_resume_continues(tmp_path):
    straight = tmp_path / "straight"
    run(train_cmd(straight, *COMMON))
    stopped = tmp_path / "stopped"
    result = start_and_signal(train_cmd(stopped, *COMMON), stopped, signal.SIGTERM, 8, lambda pid: pid)
    assert result.returncode == PREEMPTED_EXIT, result.stdout[-3000:]
    at = stopped_step(stopped)
    assert 8 <= at < STEPS
    assert f"megapgs: stopped by SIGTERM after {at} steps" in result.stdout
    assert "zero-shot" not in result.stdout  # no evaluation when the time is short
    resumed = run(train_cmd(stopped, *COMMON, "--resume", "auto"))
    assert f"trained {STEPS - at} steps (to step {STEPS}" in resumed.stdout
    assert_continues_the_straight_run(straight, stopped, at)


@pytest.mark.multiprocess
def test_sigusr1_to_one_of_two_ranks_stops_both_at_the_same_step(tmp_path):
    two = ["--set", "train.micro_batch_size=16"]
    straight = tmp_path / "straight"
    run(train_cmd(straight, *COMMON, *two, ranks=2, port=29581))
    stopped = tmp_path / "stopped"

    def one_rank(launcher_pid: int) -> int:  # a rank, not the launcher: the others hear of it only from it
        children = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
        return int(sorted(children)[-1])

    result = start_and_signal(train_cmd(stopped, *COMMON, *two, ranks=2, port=29582), stopped, signal.SIGUSR1, 8,
                              one_rank)
    assert result.returncode != 0 and f"exitcode  : {PREEMPTED_EXIT}" in result.stdout, result.stdout[-3000:]
    at = stopped_step(stopped)
    assert 8 <= at < STEPS
    assert len(list((stopped / "checkpoints" / f"step_{at:08d}").glob("*rank*"))) >= 2  # both ranks' files
    run(train_cmd(stopped, *COMMON, *two, "--resume", "auto", ranks=2, port=29583))
    assert_continues_the_straight_run(straight, stopped, at)
