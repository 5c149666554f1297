"""Issue 15, item 6: under ZeRO-3 the model is built partitioned (deepspeed.zero.Init), with the
weights and the optimizer's weight-decay groups of the model built whole: the loss curves are
identical. (tests/e2e/test_init_from.py checks that two ranks each hold half and that
train.init_from loads into the partitions.)"""
import pytest

from tests.e2e.test_train import SYNTHETIC, run, train_cmd, train_records

ZERO3 = [*SYNTHETIC[:10], "--set", "train.steps=6", "--set", "train.global_batch_size=16", "--set",
         "train.micro_batch_size=16", "--set", 'deepspeed={"zero_optimization": {"stage": 3}}']


@pytest.mark.multiprocess
def test_partitioned_construction_trains_as_the_whole_model(tmp_path):
    curves = {}
    for partitioned in ("true", "false"):
        run_dir = tmp_path / partitioned
        result = run(train_cmd(run_dir, *ZERO3, "--set", f"model.partitioned_init={partitioned}"))
        assert ("built partitioned (zero.Init)" in " ".join(result.stderr.split())) == (partitioned == "true")
        curves[partitioned] = [record["loss"] for _, record in sorted(train_records(run_dir).items())]
    assert len(curves["true"]) == 6 and curves["true"] == curves["false"]  # exactly
