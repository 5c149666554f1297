"""What a resume may change (megapgs/train/resume_check.py): the saved config against the new one."""
import json

import pytest

from megapgs.config import load_config
from megapgs.train.resume_check import REFUSED, compare_configs


def config(*overrides: str) -> dict:
    shards = ["data.train_shards=/data/{0..9}.tar"] if "data.source=webdataset" in overrides else []
    return json.loads(load_config(None, [*overrides, *shards, "eval.shards=/data/eval"]).model_dump_json())


SAVED = config()


@pytest.mark.parametrize("override, key", [
    ("model.arch=tiny-32", "model.arch"),
    ("train.loss=siglip", "train.loss"),
    ('deepspeed={"zero_optimization": {"stage": 3}}', "zero stage"),
    ('deepspeed={"zero_optimization": {"stage": 1}, "bf16": {"enabled": true}}', "precision"),
    ("optim.weight_decay=0.05", "optim.weight_decay"),
    ("optim.betas=[0.9, 0.95]", "optim.betas"),
    ("optim.eps=1e-8", "optim.eps"),
    ("data.source=webdataset", "data.source"),
    ("data.loader=dali", "data.loader"),
])
def test_refused_changes_name_the_key_both_values_and_why(override, key):
    refused, _ = compare_configs(SAVED, config(override))
    assert any(line.startswith(f"{key}: ") and "(saved) ->" in line and REFUSED[key] in line for line in refused), refused


@pytest.mark.parametrize("override", [
    "train.steps=5000", "optim.lr=5e-4", "optim.warmup_steps=10", "optim.schedule=constant", "pgs.min_mask_ratio=0.5",
    "model.attention=reference", "model.grad_checkpointing=true", "eval.every_steps=7", "log.every_steps=3",
    "train.global_batch_size=256", "data.shuffle_buffer=10", 'deepspeed={"zero_optimization": {"stage": 0}, '
    '"gradient_clipping": 0.5}',
])
def test_accepted_changes_are_listed_not_refused(override):
    refused, accepted = compare_configs(SAVED, config(override))
    assert refused == [] and len(accepted) == 1, (refused, accepted)


def test_the_same_run_elsewhere_changes_nothing():
    assert compare_configs(SAVED, config("train.output_dir=/elsewhere", "train.resume=auto")) == ([], [])


def test_a_saved_arch_this_version_cannot_read_is_compared_by_name():
    saved = {**SAVED, "model": {**SAVED["model"], "arch": "/gone/model-config.json"}}
    refused, _ = compare_configs(saved, SAVED)
    assert refused and "another architecture" in refused[0]


def test_a_setting_the_saved_version_did_not_have_is_accepted():
    saved = {**SAVED, "data": {k: v for k, v in SAVED["data"].items() if k != "loader"}}
    assert compare_configs(saved, SAVED) == ([], ['data.loader: null (saved) -> "auto" (now)'])
