"""megapgs/train/reshard.py without a training run: when a resume needs DeepSpeed's Universal
Checkpoint, and a conversion that fails leaves nothing behind and says what to do."""
import json
import subprocess
import sys

import pytest
import torch

from megapgs.config import REPO_ROOT
from megapgs.train.checkpoint import COMPLETE
from megapgs.train.reshard import ReshardError, convert_to_universal, needs_universal


def fake_checkpoint(path, world_size: int, zero_files: bool):
    path.mkdir(parents=True)
    (path / COMPLETE).write_text(json.dumps({"world_size": world_size, "step": 5, "samples_seen": 160}))
    if zero_files:  # ZeRO-1/2/3: the optimizer state in per-rank partitions
        for rank in range(world_size):
            torch.save({"not": "deepspeed's"}, path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    else:           # ZeRO-0: whole weights and optimizer state in one file
        torch.save({}, path / "mp_rank_00_model_states.pt")
    return path


def test_only_partitioned_checkpoints_of_another_world_size_need_converting(tmp_path):
    zero3 = fake_checkpoint(tmp_path / "zero3", 2, zero_files=True)
    zero0 = fake_checkpoint(tmp_path / "zero0", 2, zero_files=False)
    assert needs_universal(zero3, 1) and needs_universal(zero3, 4)
    assert not needs_universal(zero3, 2)
    assert not needs_universal(zero0, 1)


def test_a_failed_conversion_leaves_nothing_and_names_the_way_out(tmp_path):
    checkpoint = fake_checkpoint(tmp_path / "step_00000005", 2, zero_files=True)
    with pytest.raises(ReshardError, match="resume on the 2 ranks that wrote it"):
        convert_to_universal(checkpoint)
    assert sorted(p.name for p in checkpoint.iterdir()) == [COMPLETE, *(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                                                                      for r in (0, 1))]


def test_the_conversion_tool_refuses_what_is_not_a_checkpoint_and_passes_zero0(tmp_path):
    def tool(path):
        return subprocess.run([sys.executable, "tools/convert_to_universal.py", str(path)], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)

    refused = tool(tmp_path)
    assert refused.returncode == 2 and "not a complete megapgs checkpoint" in refused.stderr
    zero0 = tool(fake_checkpoint(tmp_path / "zero0", 2, zero_files=False))
    assert zero0.returncode == 0 and "resumes on any number of ranks as it is" in zero0.stdout
    assert not (tmp_path / "zero0" / "universal").exists()
