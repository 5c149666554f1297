"""Issue 7, acceptance 4, on the resume path: a checkpoint file that would run code when DeepSpeed
unpickles it stops `--resume auto` with a clear error (exit 2), and the code never runs."""
import os
import subprocess
import sys

import torch

from megapgs.config import REPO_ROOT

RUN = ["launch/pretrain.py", "--set", "data.source=synthetic", "--set", "pgs.masking=none",
       "--set", "train.global_batch_size=16", "--set", "train.micro_batch_size=16", "--set", "eval.zeroshot=false",
       "--set", "eval.retrieval=false", "--set", "log.progress=false"]


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_resume_refuses_a_checkpoint_file_that_would_run_code(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.run([sys.executable, *RUN, "--set", "train.steps=1", "--set", f"train.output_dir={run_dir}"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    (model_file,) = (run_dir / "checkpoints" / "step_00000001").glob("*model_states.pt")
    marker = tmp_path / "code_ran"
    state = torch.load(model_file, weights_only=False)  # our own file, from the run above
    torch.save({**state, "extra": Payload(marker)}, model_file)
    resumed = subprocess.run([sys.executable, *RUN, "--set", "train.steps=2", "--set", f"train.output_dir={run_dir}",
                              "--resume", "auto"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    output = " ".join((resumed.stdout + resumed.stderr).split())
    assert resumed.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert "refused to load, it asks for posix.mkdir" in output
    assert not marker.exists()
