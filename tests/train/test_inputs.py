"""Which loader a run gets: `data.loader: auto` falls back to webdataset + PIL, with one warning that
says why, when DALI is installed but cannot load or start (library, driver); DALI asked for by name,
and faults of the data, are not hidden by a fallback."""
import logging
import sys

import pytest
import torch

from megapgs.config import load_config
from megapgs.data import dali
from megapgs.data.faults import DataError
from megapgs.data.prepare import DataPlan
from megapgs.data.wds import TrainLoader
from megapgs.dist import DistInfo
from megapgs.train import inputs
from megapgs.train.plan import plan_run
from tests.data.loader_photos import photo_shards

ONE_RANK = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _build(tmp_path, loader: str, failure: BaseException, monkeypatch):
    urls = tuple(photo_shards(tmp_path / "photos"))
    cfg = load_config(None, ["data.source=webdataset", f"data.train_shards={tmp_path}/photos/manifest.json",
                             f"data.loader={loader}", "data.workers=0", "train.micro_batch_size=4",
                             "train.global_batch_size=4", "eval.zeroshot=false", "eval.retrieval=false"])
    data = DataPlan(urls, 20, None, None, train_index=())
    monkeypatch.setattr(inputs, "loader_backend", lambda cfg, dist: "dali")  # as on a GPU with DALI installed

    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(dali, "build_dali_loader", broken)
    return inputs.build_loader(cfg, data, plan_run(cfg, ONE_RANK, data), ONE_RANK, tokenizer=None)


def test_auto_falls_back_to_the_cpu_loader_when_dali_cannot_start(tmp_path, monkeypatch, caplog):
    failure = RuntimeError("CUDA driver version is insufficient for CUDA runtime version\nmore detail")
    with caplog.at_level(logging.WARNING):
        loader = _build(tmp_path, "auto", failure, monkeypatch)
    assert isinstance(loader, TrainLoader)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CUDA driver version is insufficient" in warnings[0] and "falls back" in warnings[0]


def test_dali_by_name_does_not_fall_back(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="driver"):
        _build(tmp_path, "dali", RuntimeError("driver too old"), monkeypatch)


def test_a_data_fault_is_not_taken_for_a_broken_dali(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no readable sample"):
        _build(tmp_path, "auto", DataError("no readable sample in the 2 indexed shards"), monkeypatch)


def test_an_epoch_loader_resumed_on_other_ranks_restarts_the_newest_epoch(caplog):
    """The nvJPEG path's EndlessFullBatches: saved by 2 ranks in epochs 3 and 4, resumed on 3 ranks,
    epoch 4 starts afresh (as on the same ranks)."""
    class OneEpoch:
        samples_per_epoch, world_size = 4, 3
        skips = None

        def __iter__(self):
            return iter(())

    loader = inputs.EndlessFullBatches(OneEpoch(), batch_size=2)
    states = [{"format": "megapgs-epochs/1", "epoch": 3}, {"format": "megapgs-epochs/1", "epoch": 4}]
    with caplog.at_level(logging.WARNING):
        loader.load_other_world_states(states, samples_seen=64)
    assert loader.epochs_started == 4 and loader.state_dict()["epoch"] == 3  # the next pass is epoch 4
    assert "written by 2 rank(s), this run has 3: epoch 4 starts afresh" in caplog.text


def test_auto_on_a_gpu_without_dali_says_so(tmp_path, monkeypatch, caplog):
    """No silent change of loader: on a GPU, `auto` without the DALI package warns that PIL decodes."""
    urls = tuple(photo_shards(tmp_path / "photos"))
    cfg = load_config(None, ["data.source=webdataset", f"data.train_shards={tmp_path}/photos/manifest.json",
                             "data.workers=0", "train.micro_batch_size=4", "train.global_batch_size=4",
                             "eval.zeroshot=false", "eval.retrieval=false"])
    data = DataPlan(urls, 20, None, None, train_index=())
    on_gpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # find_spec: not installed
    with caplog.at_level(logging.WARNING):
        loader = inputs.build_loader(cfg, data, plan_run(cfg, ONE_RANK, data), on_gpu, tokenizer=None)
    assert isinstance(loader, TrainLoader)
    assert "DALI is not installed" in caplog.text and "requirements-gpu.txt" in caplog.text
