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


def test_a_retrieval_set_is_evaluated_for_retrieval_alone(tmp_path):
    """clip_benchmark's retrieval layout has no class names: retrieval alone takes it, zero-shot says why not."""
    _shards(tmp_path / "heldout" / "test")
    (tmp_path / "heldout" / "dataset_type.txt").write_text("retrieval\n")
    overrides = ["data.source=synthetic", f"eval.shards={tmp_path}/heldout", "eval.retrieval=true"]
    plan = prepare_data(load_config(None, [*overrides, "eval.zeroshot=false"]), ONE_RANK)
    assert plan.eval_root == tmp_path / "heldout" and plan.eval_samples == 25
    with pytest.raises(DataError, match="no classnames.txt.*a retrieval set: set eval.zeroshot=false"):
        prepare_data(load_config(None, [*overrides, "eval.zeroshot=true"]), ONE_RANK)


def test_synthetic_source_needs_no_files():
    cfg = load_config(None, ["data.source=synthetic", "eval.zeroshot=false", "eval.retrieval=false"])
    plan = prepare_data(cfg, ONE_RANK)
    assert plan.train_urls == () and plan.describe() == "synthetic data"


# ----------------------------------------------------------------------------- shards without a manifest

def _gpu_loader_config(tmp_path, *extra):
    return load_config(None, ["data.source=webdataset", f"data.train_shards={tmp_path}/shards/{{0..1}}.tar",
                              "data.loader=dali", f"data.index_dir={tmp_path}/index", "eval.zeroshot=false",
                              "eval.retrieval=false", *extra])


def _photo_shards(folder):
    from tests.data.loader_photos import photo_shards

    return photo_shards(folder)


def test_the_first_rank_of_a_node_indexes_and_the_others_wait_for_the_file(tmp_path):
    import threading

    _photo_shards(tmp_path / "shards")
    cfg = _gpu_loader_config(tmp_path)
    second = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    waited: dict = {}
    waiter = threading.Thread(target=lambda: waited.setdefault("plan", prepare_data(cfg, second)))
    waiter.start()  # it waits: nothing is indexed yet
    waiter.join(timeout=2)
    assert waiter.is_alive()
    first = prepare_data(cfg, DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu")))
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert first.train_samples == waited["plan"].train_samples == 20
    assert [s.path for s in first.train_index] == [s.path for s in waited["plan"].train_index]
    assert len(list((tmp_path / "index").rglob("manifest.json"))) == 1


def test_a_waiting_rank_does_not_take_the_manifest_of_shards_changed_since(tmp_path):
    """An earlier run's manifest of the same shards is taken only while they are as it saw them."""
    import os
    import threading

    _photo_shards(tmp_path / "shards")
    cfg = _gpu_loader_config(tmp_path)
    first = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    second = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    prepare_data(cfg, first)  # an earlier run's index
    shard = tmp_path / "shards" / "1.tar"
    shard.write_bytes(shard.read_bytes()[:-10240])  # rewritten since: 10 KiB shorter
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    waited: dict = {}
    waiter = threading.Thread(target=lambda: waited.setdefault("plan", prepare_data(cfg, second)))
    waiter.start()
    waiter.join(timeout=2.5)
    assert waiter.is_alive(), "took a manifest whose shard changed"
    again = prepare_data(cfg, first)  # the first rank indexes the changed shard again
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert waited["plan"].train_samples == again.train_samples


def test_a_waiting_rank_stops_when_the_indexing_rank_failed(tmp_path, monkeypatch):
    from megapgs.data import prepare

    _photo_shards(tmp_path / "shards")
    cfg = _gpu_loader_config(tmp_path)

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prepare, "index_shards", failing)
    with pytest.raises(OSError, match="disk full"):
        prepare_data(cfg, ONE_RANK)
    second = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    with pytest.raises(DataError, match="could not index the shards: OSError: disk full"):
        prepare_data(cfg, second)


def test_a_cpu_run_reads_no_shard_to_start(tmp_path, monkeypatch):
    """The webdataset loader needs no index: a brace pattern starts without reading or indexing."""
    from megapgs.data import prepare

    _photo_shards(tmp_path / "shards")
    monkeypatch.setattr(prepare, "index_shards", lambda *a, **k: pytest.fail("indexed for the CPU loader"))
    cfg = _gpu_loader_config(tmp_path, "data.loader=wds")
    plan = prepare_data(cfg, ONE_RANK)
    assert plan.train_index is None and plan.train_samples is None and len(plan.train_urls) == 2


def test_a_checked_manifest_is_taken_as_it_is(tmp_path, monkeypatch):
    from megapgs.data import prepare

    manifest = write_shards(({"__key__": f"{i:04d}", "txt": f"caption {i}", "png": b"x"} for i in range(4)),
                            tmp_path, 2, checked=True)
    assert manifest["format"] == "megapgs-shards/2" and all("mtime_ns" in s for s in manifest["shards"])
    monkeypatch.setattr(prepare, "index_shards", lambda *a, **k: pytest.fail("a checked manifest indexed again"))
    cfg = load_config(None, ["data.source=webdataset", f"data.train_shards={tmp_path}/manifest.json",
                             "data.loader=dali", "eval.zeroshot=false", "eval.retrieval=false"])
    plan = prepare_data(cfg, ONE_RANK)
    assert [s.samples for s in plan.train_index] == [2, 2]
