"""Which loader a run gets: `data.loader: auto` falls back to webdataset + PIL, with one warning that
says why, when DALI is installed but cannot load or start (library, driver); DALI asked for by name,
and faults of the data, are not hidden by a fallback."""
import logging

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
