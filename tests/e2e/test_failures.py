"""Issue 15, item 9: failures a user causes or meets end in one message naming the cause and the way
out, and an exit code of their own (megapgs/exit_codes.py), never a traceback."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megapgs import exit_codes
from megapgs.config import REPO_ROOT

RUN = ["--set", "data.source=synthetic", "--set", "pgs.masking=none", "--set", "train.global_batch_size=16",
       "--set", "train.micro_batch_size=16", "--set", "eval.zeroshot=false", "--set", "eval.retrieval=false",
       "--set", "log.progress=false", "--set", "log.tensorboard=false"]


def pretrain(*args: str, python: list[str] | None = None) -> tuple[int, str]:
    cmd = [sys.executable, *(python or ["launch/pretrain.py"]), *RUN, *args]
    env = {**os.environ, "COLUMNS": "1000"}  # rich's log lines unwrapped: a path stays in one piece
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    return result.returncode, " ".join((result.stdout + result.stderr).split())


def test_resume_with_other_towers_is_refused_and_accepted_changes_resume(tmp_path):
    run_dir = tmp_path / "run"
    code, out = pretrain("--set", "train.steps=1", "--set", f"train.output_dir={run_dir}")
    assert code == 0, out[-3000:]
    code, out = pretrain("--set", "train.steps=2", "--set", f"train.output_dir={run_dir}", "--resume", "auto",
                         "--set", "model.arch=tiny-32", "--set", "optim.lr=5e-4")
    assert code == exit_codes.RESUME_REFUSED == 4 and "Traceback" not in out, out[-3000:]
    assert "size mismatch" not in out
    assert 'model.arch: "tiny-28" (saved) -> "tiny-32" (now): the weights of other towers have other shapes' in out
    assert "optim.lr" not in out.split("A resume may change:")[0]  # an accepted change is not blamed
    assert f"Resume with the saved values (they are in {run_dir}/checkpoints/step_00000001/COMPLETE" in out
    assert json.loads((run_dir / "config.json").read_text())["model"]["arch"] == "tiny-28"  # not overwritten

    code, out = pretrain("--set", "train.steps=2", "--set", f"train.output_dir={run_dir}", "--resume", "auto",
                         "--set", "optim.lr=5e-4", "--set", "log.every_steps=2")
    assert code == exit_codes.OK, out[-3000:]
    assert "with changed settings:" in out and "optim.lr: 0.002 (saved) -> 0.0005 (now)" in out
    assert "train.steps: 1 (saved) -> 2 (now)" in out and "trained 1 steps (to step 2" in out


def test_an_output_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, out = pretrain("--set", "train.steps=1", "--set", f"train.output_dir={blocker / 'run'}")
    assert code == exit_codes.OUTPUT_DIR == 5 and "Traceback" not in out, out[-3000:]
    assert f"train.output_dir='{blocker / 'run'}' cannot be used: Not a directory" in out
    assert "free of" in out and f"on the file system holding {blocker}" in out
    assert "--set train.output_dir=PATH" in out


# torch.save into step 2's files fails the way torch's zip writer reports a disk that filled mid-file
FULL_AT_STEP_2 = textwrap.dedent("""
    import runpy, sys, torch
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if "step_00000002" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3584 vs 3476")
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
    sys.argv = ["launch/pretrain.py", *sys.argv[1:]]
    runpy.run_path("launch/pretrain.py", run_name="__main__")
""")


def assert_disk_full_exit(code: int, out: str, run_dir: Path) -> None:
    assert code == exit_codes.DISK_FULL == 6 and "Traceback" not in out, out[-3000:]
    ckpt_dir = run_dir / "checkpoints"
    assert f"writing checkpoint {ckpt_dir / 'step_00000002'} ran out of disk space" in out
    assert f"The last complete checkpoint is {ckpt_dir / 'step_00000001'} (`latest` points to it)" in out
    assert "continue with --resume auto" in out and "free of" in out
    assert (ckpt_dir / "latest").read_text() == "step_00000001"
    assert not (ckpt_dir / "step_00000002").exists()  # the half-written checkpoint is gone, its space free


def test_a_disk_that_fills_while_a_checkpoint_is_written_patched_writer(tmp_path):
    wrapper = tmp_path / "full_at_step_2.py"
    wrapper.write_text(FULL_AT_STEP_2)
    run_dir = tmp_path / "run"
    code, out = pretrain("--set", "train.steps=3", "--set", "train.checkpoint_every=1", "--set",
                         f"train.output_dir={run_dir}", python=[str(wrapper)])
    assert "unexpected pos 3584 vs 3476" in out
    assert_disk_full_exit(code, out, run_dir)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 MB tmpfs: room for one checkpoint of the tiny model (43 MB), not two. Needs root."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the patched-writer test covers the path")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_disk_that_fills_while_a_checkpoint_is_written_real_tmpfs(small_tmpfs):
    run_dir = small_tmpfs / "run"
    code, out = pretrain("--set", "train.steps=3", "--set", "train.checkpoint_every=1", "--set", "train.keep_last=2",
                         "--set", f"train.output_dir={run_dir}")
    assert_disk_full_exit(code, out, run_dir)
