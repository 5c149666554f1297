"""Evaluation shared by ranks (issue 15, item 4): each rank reads and embeds only its block of the
held-out set, and every rank ends with exactly the numbers of one rank evaluating alone; every rank
runs the same number of forwards (ZeRO-3 gathers parameters collectively in each)."""
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from megapgs.config import ModelConfig
from megapgs.data.eval_data import eval_units, iter_unit_batches, rank_units
from megapgs.data.faults import SkipCounter
from megapgs.data.shards import read_shard
from megapgs.data.tokenizer import Tokenizer
from megapgs.dist import DistInfo, all_reduce_sum, process_group_backend
from megapgs.evals.evaluate import evaluate_batches
from tests.data.faulty_shards import CUT_SAMPLE, SHARD_SIZE, TRUNCATED_SHARD, write_faulty_shards

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    return write_faulty_shards(tmp_path_factory.mktemp("faulty"))


def _shards(faulty):
    return [str(faulty.manifest.parent / f"{i}.tar") for i in range(6)]


@pytest.mark.parametrize("numbers", [range(0, 3), range(2, 6), range(5, 8), {1, 4, 7}, ()])
def test_the_numbered_samples_of_a_shard(faulty, numbers):
    shard = _shards(faulty)[2]
    whole = list(read_shard(shard, SkipCounter()))
    part = list(read_shard(shard, SkipCounter(), set(numbers)))
    assert len(whole) == SHARD_SIZE and part == [whole[n] for n in sorted(numbers)]


def test_ranges_of_a_truncated_shard_count_its_cut_once(faulty):
    shard = _shards(faulty)[TRUNCATED_SHARD]
    cut_counts = []
    for start, stop in ((0, 3), (3, 6), (6, 8)):
        skips = SkipCounter()
        keys = [s["__key__"] for s in read_shard(shard, skips, set(range(start, stop)))]
        assert len(keys) == max(0, min(stop, CUT_SAMPLE) - start)
        cut_counts.append(skips.counts["tar_truncated"])
    assert cut_counts == [0, 1, 0]  # the range holding the damaged sample


@pytest.mark.parametrize("batch_size,world_size", [(3, 1), (3, 2), (8, 3), (5, 4), (100, 3)])
def test_ranks_read_every_good_sample_once_and_count_each_fault_once(faulty, batch_size, world_size):
    units = eval_units(_shards(faulty), batch_size)
    assert all(u.stop - u.start <= batch_size for u in units)
    keys, skips = [], SkipCounter()
    for rank in range(world_size):
        for batch in iter_unit_batches(rank_units(units, rank, world_size), image_size=IMAGE_SIZE, skips=skips):
            if batch is not None:
                keys += batch[3]
    assert keys == sorted(keys) and set(keys) == faulty.good_keys and len(keys) == len(faulty.good_keys)
    assert skips.nonzero() == faulty.expected_skips


def test_max_samples_takes_the_first_samples_of_the_set(faulty):
    units = eval_units(_shards(faulty), 3, max_samples=10)
    assert [(os.path.basename(u.shard), u.start, u.stop) for u in units] == [
        ("0.tar", 0, 3), ("0.tar", 3, 6), ("0.tar", 6, 8), ("1.tar", 0, 2)]


def test_workers_give_the_batches_of_the_process_itself(faulty):
    units = eval_units(_shards(faulty), 3)
    alone = list(iter_unit_batches(units, image_size=IMAGE_SIZE))
    skips = SkipCounter()
    shared = list(iter_unit_batches(units, image_size=IMAGE_SIZE, workers=2, skips=skips))
    assert len(alone) == len(shared) == len(units)
    for a, b in zip(alone, shared):
        assert (a is None and b is None) or (torch.equal(a[0], b[0]) and a[3] == b[3])
    assert skips.nonzero() == faulty.expected_skips


# ----------------------------------------------------------------------------- ranks

class CollectiveForwards(torch.nn.Module):
    """The model behind one all-reduce per forward, as ZeRO-3's parameter gathers: a rank running
    fewer forwards than the others makes the group time out instead of passing."""

    def __init__(self, model, dist):
        super().__init__()
        self.model, self.dist, self.forwards = model, dist, 0

    def _together(self):
        self.forwards += 1
        all_reduce_sum(torch.ones(1), self.dist)

    def encode_image(self, images):
        self._together()
        return self.model.encode_image(images)

    def encode_text(self, tokens, lengths=None):
        self._together()
        return self.model.encode_text(tokens, lengths)


def _rank(rank, world_size, port, shards, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world_size > 1:
        tdist.init_process_group(process_group_backend(torch.device("cpu")), rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=60))
    dist = DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    torch.manual_seed(0)
    from megapgs.models.clip import build_model

    model = CollectiveForwards(build_model(ModelConfig(arch="tiny-32", attention="reference"), training=False), dist)
    units = rank_units(eval_units(shards, 3), rank, world_size)
    skips = SkipCounter()
    metrics = evaluate_batches(model, iter_unit_batches(units, image_size=IMAGE_SIZE, skips=skips),
                               Tokenizer("tiny-32"), device=dist.device, classnames=["plane", "car", "bird", "cat"],
                               templates=["a photo of a {c}.", "a {c}."], retrieval=True, dist=dist,
                               image_size=IMAGE_SIZE, prompt_batch_size=3)
    metrics.pop("eval_seconds")
    torch.save({"metrics": metrics, "forwards": model.forwards, "skips": skips.counts}, f"{out}/{rank}.pt")
    if world_size > 1:
        tdist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _evaluate_on(world_size, shards, out):
    out.mkdir()
    mp.spawn(_rank, args=(world_size, _free_port(), shards, str(out)), nprocs=world_size, join=True)
    return [torch.load(out / f"{r}.pt") for r in range(world_size)]


def test_two_and_three_ranks_evaluate_exactly_like_one(faulty, tmp_path):
    shards = _shards(faulty)
    (alone,) = _evaluate_on(1, shards, tmp_path / "one")
    assert alone["metrics"]["eval_samples"] == len(faulty.good_keys)
    assert {"zeroshot_top1", "image_to_text_R@1", "text_to_image_R@10"} <= set(alone["metrics"])
    for world_size in (2, 3):
        ranks = _evaluate_on(world_size, shards, tmp_path / f"w{world_size}")
        for result in ranks:
            assert result["metrics"] == alone["metrics"]  # exactly, on every rank
        assert len({r["forwards"] for r in ranks}) == 1  # the same forwards on every rank
        merged = SkipCounter()
        for result in ranks:
            merged.merge(result["skips"])
        assert merged.nonzero() == faulty.expected_skips
