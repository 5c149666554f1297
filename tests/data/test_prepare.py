import logging

import pytest
import torch

from megapgs.config import load_config
from megapgs.data.prepare import DataError, prepare_data, resolve_shards
from megapgs.data.shards import write_shards
from megapgs.dist import DistInfo

ONE_RANK = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _shards(folder, count=25, shard_size=10):
    samples = ({"__key__": f"{i:04d}", "txt": f"caption {i}"} for i in range(count))
    return write_shards(samples, folder, shard_size, total=count)


def test_brace_pattern_with_missing_shards_warns(tmp_path, caplog):
    _shards(tmp_path)
    with caplog.at_level(logging.WARNING):
        urls, samples = resolve_shards(str(tmp_path / "{0..4}.tar"), "data.train_shards")
    assert len(urls) == 5 and samples is None
    assert "2 of 5 shards are missing" in caplog.text


def test_no_shard_at_all_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"data.train_shards: none of the 3 shards"):
        resolve_shards(str(tmp_path / "{0..2}.tar"), "data.train_shards")


def test_manifest_gives_urls_and_count(tmp_path):
    manifest = _shards(tmp_path)
    assert [s["samples"] for s in manifest["shards"]] == [10, 10, 5]
    urls, samples = resolve_shards(str(tmp_path / "manifest.json"), "data.train_shards")
    assert samples == 25 and urls == tuple(str(tmp_path / f"{i}.tar") for i in range(3))


def test_remote_urls_are_not_checked():
    urls, _ = resolve_shards("pipe:aws s3 cp s3://bucket/{0..9}.tar -", "data.train_shards")
    assert len(urls) == 10


def test_webdataset_run_with_eval_set_that_is_not_one(tmp_path):
    _shards(tmp_path / "train")
    cfg = load_config(None, ["data.source=webdataset", f"data.train_shards={tmp_path}/train/manifest.json",
                             f"eval.shards={tmp_path}/nowhere"])
    with pytest.raises(DataError, match="eval.shards: .* is not an eval set"):
        prepare_data(cfg, ONE_RANK)


def test_synthetic_source_needs_no_files():
    cfg = load_config(None, ["data.source=synthetic", "eval.zeroshot=false", "eval.retrieval=false"])
    plan = prepare_data(cfg, ONE_RANK)
    assert plan.train_urls == () and plan.describe() == "synthetic data"
