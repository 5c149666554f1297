"""Checkpoint bookkeeping: a save interrupted at any point leaves the previous one usable."""
from pathlib import Path

import pytest
import torch

from megapgs.dist import DistInfo
from megapgs.train.checkpoint import COMPLETE, TrainState, complete_checkpoints, find_resume, save_checkpoint

ONE_RANK = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class FakeEngine:
    """Writes what DeepSpeed writes for one rank; can be told to die half-way through a save."""

    def __init__(self, die_at_step: int | None = None):
        self.die_at_step = die_at_step

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert save_latest is False  # megapgs writes `latest` itself, after the checkpoint is complete
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.ones(2)}}, path / "mp_rank_00_model_states.pt")
        if self.die_at_step is not None and tag.endswith(f"{self.die_at_step:08d}"):
            raise KeyboardInterrupt("killed during the save")


def save(engine, ckpt_dir, step, keep_last=3):
    return save_checkpoint(engine, ckpt_dir, TrainState(step, step * 16, {"epoch": 0, "batches": step}), ONE_RANK,
                           keep_last, '{"train": {}}')


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    save(FakeEngine(), ckpt_dir, 10)
    with pytest.raises(KeyboardInterrupt):
        save(FakeEngine(die_at_step=20), ckpt_dir, 20)
    assert (ckpt_dir / "step_00000020").is_dir() and not (ckpt_dir / "step_00000020" / COMPLETE).exists()
    assert find_resume(ckpt_dir, "auto") == ckpt_dir / "step_00000010"
    assert (ckpt_dir / "latest").read_text() == "step_00000010"
    rank_state = torch.load(ckpt_dir / "step_00000010" / "megapgs_rank0.pt", weights_only=True)
    assert rank_state["step"] == 10 and rank_state["loader"] == {"epoch": 0, "batches": 10}
    # the next complete save clears the half-written directory
    save(FakeEngine(), ckpt_dir, 30)
    assert not (ckpt_dir / "step_00000020").exists()
    assert find_resume(ckpt_dir, "auto") == ckpt_dir / "step_00000030"


def test_keep_last_and_explicit_paths(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save(FakeEngine(), ckpt_dir, step, keep_last=2)
    assert [p.name for p in complete_checkpoints(ckpt_dir)] == ["step_00000003", "step_00000004"]
    assert find_resume(ckpt_dir, "none") is None
    assert find_resume(ckpt_dir, str(ckpt_dir / "step_00000003")) == ckpt_dir / "step_00000003"
    with pytest.raises(FileNotFoundError, match="no complete megapgs checkpoint"):
        find_resume(ckpt_dir, str(ckpt_dir / "step_00000001"))
    assert find_resume(tmp_path / "nothing", "auto") is None
