"""Issue 15, item 4, through the whole run: under ZeRO-3 (a collective in every forward) two ranks
evaluate their halves of a held-out set whose halves differ in batch count and in faults, and log
exactly the numbers one rank logs (the weights barely move: lr 1e-9, one step)."""
import json

import pytest

from tests.data.faulty_shards import write_faulty_shards
from tests.e2e.test_train import SYNTHETIC, run, train_cmd

CLASSES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def eval_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if json.loads(line)["kind"] == "eval"]
    for record in records:
        record.pop("eval_seconds")
        record.pop("time", None)
    return records


@pytest.mark.multiprocess
def test_two_zero3_ranks_evaluate_like_one(tmp_path):
    root = tmp_path / "heldout"
    faulty = write_faulty_shards(root / "test")
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na blurry {c}.\n")
    common = [*SYNTHETIC[:4], "--set", "train.steps=1", "--set", "optim.warmup_steps=0", "--set", "optim.lr=1e-9",
              "--set", "train.global_batch_size=8", "--set", f"eval.shards={root}", "--set", "eval.zeroshot=true",
              "--set", "eval.retrieval=true", "--set", "eval.batch_size=3",
              "--set", 'deepspeed={"zero_optimization": {"stage": 3}}']
    run(train_cmd(tmp_path / "one", *common, "--set", "train.micro_batch_size=8"))
    run(train_cmd(tmp_path / "two", *common, "--set", "train.micro_batch_size=4", "--set", "eval.workers=1",
                  ranks=2, port=29597))
    (one,), (two,) = eval_records(tmp_path / "one"), eval_records(tmp_path / "two")
    on_disk = {reason: n for reason, n in faulty.expected_skips.items() if reason != "shard_missing"}  # test/*.tar
    assert one["eval_samples"] == len(faulty.good_keys) and one["eval_skipped"] == sum(on_disk.values())
    assert two == one
