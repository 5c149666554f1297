"""The contrastive batch is the global batch, whatever the accumulation: 1 rank x 4 micro-batches
of 8 and 2 ranks x 2 x 8 give the loss and every gradient of 1 rank x 32, through the real engine
(DeepSpeed, PGS masks, the feature cache), in fp32."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from megapgs.config import load_config
from megapgs.data.prepare import prepare_data
from megapgs.dist import init_distributed
from megapgs.perf.timers import StageTimer
from megapgs.train.engine import build_engine
from megapgs.train.inputs import build_loader
from megapgs.train.loss import ContrastiveLoss
from megapgs.train.plan import plan_run
from megapgs.train.step import MicroBatch, TrainStep, pgs_masker

GLOBAL_BATCH = 32


def overrides(micro: int, stage: int, contrastive: str, packed_length: str, loss: str) -> list[str]:
    return [f"train.loss={loss}", "data.source=synthetic", "pgs.masking=pgs", "pgs.rng=sample", "pgs.unmasked_tail=0",
            f"pgs.packed_length={packed_length}", f"train.global_batch_size={GLOBAL_BATCH}",
            f"train.micro_batch_size={micro}", f"train.contrastive_batch={contrastive}", "train.steps=10",
            "eval.zeroshot=false", "eval.retrieval=false", f'deepspeed={{"zero_optimization": {{"stage": {stage}}}}}']


def one_step(micro: int, stage: int, contrastive: str = "global", packed_length: str = "exact", loss: str = "clip"):
    """(loss, {name: full gradient}) of the first optimizer step, read just before it is taken."""
    from deepspeed.utils import safe_get_full_grad

    cfg = load_config(None, overrides(micro, stage, contrastive, packed_length, loss))
    dist = init_distributed()
    data = prepare_data(cfg, dist)
    plan = plan_run(cfg, dist, data)
    engine, model = build_engine(cfg, plan, dist)
    loss_fn = ContrastiveLoss(cfg.train.loss, cfg.train.local_loss, cfg.train.gather_with_grad, dist)
    batches = iter(build_loader(cfg, data, plan, dist, tokenizer=None))
    grads = {}
    take_step = engine.step

    def step_reading_gradients():
        if engine.is_gradient_accumulation_boundary():  # every rank, same order: a collective for ZeRO-3
            for name, param in model.named_parameters():
                grads[name] = safe_get_full_grad(param).detach().clone()
        take_step()

    engine.step = step_reading_gradients
    timer, micro_batches = StageTimer(dist.device), []
    for m in range(plan.grad_accum_steps):  # the masks the training loop draws at step 0
        batch = next(batches)
        keep = pgs_masker(cfg, plan, dist, 0, m, 0.0, timer)
        micro_batches.append(MicroBatch(batch.images, batch.tokens, batch.text_lengths, keep))
    out = TrainStep(engine, loss_fn, plan.feature_caching, timer)(micro_batches)
    return float(out.loss), grads


def _rank_worker(rank: int, port: int, micro: int, stage: int, packed_length: str, results: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    loss, grads = one_step(micro, stage, packed_length=packed_length)
    if rank == 0:
        results["loss"], results["grads"] = loss, grads
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def two_ranks(micro: int, stage: int, packed_length: str):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_worker, args=(port, micro, stage, packed_length, results), nprocs=2, join=True)
        return results["loss"], dict(results["grads"])


def assert_same_step(step, reference, tol=1e-5):
    loss, grads = step
    ref_loss, ref_grads = reference
    assert loss == pytest.approx(ref_loss, rel=tol)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        ref = ref_grads[name]
        scale = ref.abs().max().clamp(min=1e-12)
        assert float((grad - ref).abs().max() / scale) <= tol, name


@pytest.fixture(scope="module")
def whole_batch():
    """1 rank x 32: no accumulation, the reference."""
    os.environ.pop("WORLD_SIZE", None)
    return one_step(GLOBAL_BATCH, stage=0)


def test_four_cached_micro_batches_give_the_whole_batch_step(whole_batch):
    assert_same_step(one_step(8, stage=0), whole_batch)


def test_the_micro_batch_loss_is_another_function(whole_batch):
    """The explicit opt-out (4 separate losses over 8 pairs) really differs: the test above can fail."""
    loss, _ = one_step(8, stage=0, contrastive="micro_batch")
    assert abs(loss - whole_batch[0]) > 1e-3


def test_siglip_through_the_feature_cache():
    """SigLIP's logit bias takes its gradient from every micro-batch's share too."""
    os.environ.pop("WORLD_SIZE", None)
    assert_same_step(one_step(8, stage=0, loss="siglip"), one_step(GLOBAL_BATCH, stage=0, loss="siglip"))


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage, packed_length", [(0, "exact"), (3, "static")])
def test_two_ranks_of_two_cached_micro_batches_give_the_whole_batch_step(whole_batch, stage, packed_length):
    assert_same_step(two_ranks(8, stage, packed_length), whole_batch)
