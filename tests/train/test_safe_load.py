"""Issue 7, acceptance 4: loading never unpickles arbitrary objects. A checkpoint file whose pickle
would run code is refused before anything in it runs, by every loader of checkpoints."""
import json
import os

import pytest
import torch

from megapgs.convert.checkpoint import read_checkpoint
from megapgs.train.checkpoint import COMPLETE
from megapgs.train.safe_load import UnsafeCheckpointError, load_weights_only, vet_checkpoint_dir


class Payload:
    """Unpickling this calls os.mkdir(marker): the stand-in for any code a crafted file runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def checkpoint_dir(tmp_path, stage: int, evil_file: str):
    path = tmp_path / "checkpoints" / "step_00000001"
    path.mkdir(parents=True)
    config = {"model": {"arch": "tiny-28"}, "deepspeed": {"zero_optimization": {"stage": stage}}}
    (path / COMPLETE).write_text(json.dumps({"step": 1, "samples_seen": 1, "world_size": 1, "config": config}))
    marker = tmp_path / "code_ran"
    torch.save({"module": {"w": torch.zeros(2)}, "extra": Payload(marker)}, path / evil_file)
    return path, marker


@pytest.mark.parametrize("stage, evil_file", [(3, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                              (3, "zero_pp_rank_0_mp_rank_00_model_states.pt"),
                                              (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                              (0, "mp_rank_00_model_states.pt")])
def test_conversion_refuses_a_file_that_would_run_code(tmp_path, stage, evil_file):
    path, marker = checkpoint_dir(tmp_path, stage, evil_file)
    with pytest.raises(UnsafeCheckpointError, match=rf"{evil_file}: refused to load, it asks for posix.mkdir"):
        read_checkpoint(path)
    assert not marker.exists()


def test_resume_vetting_and_rank_files_refuse_it_too(tmp_path):
    path, marker = checkpoint_dir(tmp_path, 3, "megapgs_rank0.pt")
    with pytest.raises(UnsafeCheckpointError, match="megapgs_rank0.pt"):
        vet_checkpoint_dir(path)  # what load_checkpoint runs before DeepSpeed's engine.load_checkpoint
    with pytest.raises(UnsafeCheckpointError, match="posix.mkdir"):
        load_weights_only(path / "megapgs_rank0.pt")
    assert not marker.exists()


def test_plain_data_and_deepspeeds_own_types_pass(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"module": {"w": torch.ones(3)}, "ds_version": "0.19.8", "shapes": [torch.Size([3])]},
               tmp_path / "mp_rank_00_model_states.pt")
    torch.save({"zero_stage": ZeroStageEnum.weights, "loss_scaler": DynamicLossScaler(2.0**16, 1000, 1, 2, False),
                "fp32_flat_groups": [torch.zeros(4)]}, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # not mappable
    vet_checkpoint_dir(tmp_path)
    assert torch.equal(load_weights_only(tmp_path / "legacy.pt")["w"], torch.ones(1))
