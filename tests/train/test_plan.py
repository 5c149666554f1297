import pytest
import torch

from megapgs.config import ConfigError, load_config
from megapgs.data.prepare import DataPlan
from megapgs.dist import DistInfo
from megapgs.train.plan import plan_run


def _dist(world_size):
    return DistInfo(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"))


DATA = DataPlan(train_urls=("0.tar",), train_samples=10_000, eval_root=None, eval_samples=None)


def test_accumulation_and_steps_from_epochs():
    cfg = load_config(None, ["train.global_batch_size=1024", "train.micro_batch_size=128",
                             "train.steps=null", "train.epochs=2.5"])
    plan = plan_run(cfg, _dist(2), DATA)
    assert (plan.grad_accum_steps, plan.total_steps) == (4, 25)  # ceil(2.5 * 10000 / 1024)
    assert plan.epochs == pytest.approx(25 * 1024 / 10_000)


def test_batch_that_does_not_split_over_ranks():
    cfg = load_config(None, ["train.global_batch_size=384", "train.micro_batch_size=128"])
    with pytest.raises(ConfigError, match="train.global_batch_size = 384 .* 128 x 2"):
        plan_run(cfg, _dist(2), DATA)


def test_epochs_need_an_epoch_size():
    cfg = load_config(None, ["train.steps=null", "train.epochs=1"])
    unknown = DataPlan(train_urls=("0.tar",), train_samples=None, eval_root=None, eval_samples=None)
    with pytest.raises(ConfigError, match="data.samples_per_epoch"):
        plan_run(cfg, _dist(1), unknown)


@pytest.mark.parametrize("masking,kept", [("none", (49, 49)), ("random", (34, 34)), ("pgs", (5, 34))])
def test_kept_tokens_by_masking(masking, kept):
    assert plan_run(load_config(None, [f"pgs.masking={masking}"]), _dist(1), DATA).kept_tokens == kept


def _on(device: str, world_size: int = 1) -> DistInfo:
    return DistInfo(rank=0, world_size=world_size, local_rank=0, device=torch.device(device))


@pytest.mark.parametrize("contrastive, accum, caching, pairs", [
    ("global", 4, True, 1024), ("micro_batch", 4, False, 256), ("global", 1, False, 1024)])
def test_the_contrastive_batch(contrastive, accum, caching, pairs, caplog):
    cfg = load_config(None, [f"train.global_batch_size={1024}", f"train.micro_batch_size={1024 // accum // 2}",
                             f"train.contrastive_batch={contrastive}"])
    if contrastive == "micro_batch":  # 1024 // 4 // 2 = 128 per rank x 2 ranks
        pairs = 256
    plan = plan_run(cfg, _on("cpu", world_size=2), DATA)
    assert (plan.grad_accum_steps, plan.feature_caching, plan.contrastive_batch_size) == (accum, caching, pairs)
    warned = [r.getMessage() for r in caplog.records if "contrastive_batch" in r.getMessage()]
    assert bool(warned) == (contrastive == "micro_batch")
    if warned:
        assert "256 pairs at a time" in warned[0] and "global batch of 1024" in warned[0]


@pytest.mark.parametrize("setting, device, static", [
    ("auto", "cuda", True), ("auto", "cpu", False), ("static", "cpu", True), ("exact", "cuda", False)])
def test_packed_length(setting, device, static):
    plan = plan_run(load_config(None, [f"pgs.packed_length={setting}"]), _on(device), DATA)
    assert plan.static_packing == static


def test_flex_is_refused_for_cuda_training():
    cfg = load_config(None, ["model.attention=flex"])
    with pytest.raises(ConfigError, match="model.attention: 'flex' is refused for CUDA training.*dense T x T"):
        plan_run(cfg, _on("cuda"), DATA)
    assert plan_run(cfg, _on("cpu"), DATA).total_steps  # on the CPU it falls back (no backward there)
