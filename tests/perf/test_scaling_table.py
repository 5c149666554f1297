"""The scaling figures of docs/SCALING.md (megapgs/perf/throughput.py, comm.py, scaling.py and
tools/scaling_table.py): the FLOP count against torch's own counter on a real tower, the ZeRO byte
counts against the collectives' definitions, and the script printing every config. Seconds, no GPU."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megapgs.config import REPO_ROOT, ModelConfig, PGSConfig, load_config
from megapgs.models.archs import get_arch
from megapgs.models.clip import build_model
from megapgs.perf.comm import H100_NODE, Collective, bytes_per_gpu, feature_bytes, step_collectives
from megapgs.perf.flops import clip_forward_flops_from_sums
from megapgs.perf.scaling import at_world, gpu_days, plan_for, run_work
from megapgs.perf.throughput import Keep, forward_passes, measured_keep, sample_work
from megapgs.pgs.keep import keep_bounds
from megapgs.pgs.pack import PatchMasker
from megapgs.pgs.selection import pgs_generator

ARCH = get_arch("tiny-32")


def vision_flops(rows: int, sq: int) -> int:
    """Our count of the image tower's forward over 4 images of `rows` rows each."""
    return clip_forward_flops_from_sums(ARCH, 4, 4 * rows, 4 * sq, 0, 0, 0)["vision"]


def torch_counted_vision_flops(keep=None) -> tuple[int, int]:
    """(FLOPs torch's FlopCounterMode counts for the image tower's forward, rows it computed). The
    reference attention back-end runs attention as batched matmuls, which the counter sees."""
    model = build_model(ModelConfig(arch="tiny-32", attention="reference"), "cpu", training=False)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.visual(images, keep=keep)
    rows = 4 * (ARCH.vision.num_patches + 1) if keep is None else int(keep.selection.packed.cu_seqlens[-1])
    return counter.get_total_flops(), rows


def test_flop_count_is_torchs_count_of_the_unmasked_tower():
    counted, _ = torch_counted_vision_flops()
    L1 = ARCH.vision.num_patches + 1
    assert vision_flops(L1, L1 * L1) == counted


def test_flop_count_is_torchs_count_of_the_rows_masking_keeps():
    masker = PatchMasker(PGSConfig(masking="random", min_mask_ratio=0.5), ARCH.vision.patch_size, 0.0,
                         pgs_generator(0, 0, 0))
    counted, rows = torch_counted_vision_flops(masker)
    k_max = keep_bounds(ARCH.vision.num_patches, 0.5, PGSConfig().min_keep_ratio)[1]
    assert rows == 4 * (k_max + 1)
    assert vision_flops(k_max + 1, (k_max + 1) ** 2) == counted
    full, _ = torch_counted_vision_flops()
    assert counted < 0.75 * full  # the blocks' rows halve; the patch embedding runs on every patch


def test_static_budget_executes_k_max_rows_and_passes_multiply():
    keep = Keep(mean_len=5.0, mean_sq_len=25.0)  # far below k_max + 1: PGS kept little
    pgs = PGSConfig(min_mask_ratio=0.3)
    args = {"masked": True, "batch": 8, "caption_tokens": 16}
    exact = sample_work(ARCH, pgs, keep, static=False, checkpointing=False, feature_caching=False, **args)
    static = sample_work(ARCH, pgs, keep, static=True, checkpointing=False, feature_caching=False, **args)
    assert exact.model_flops == static.model_flops == exact.executed_flops  # 3 passes over the kept rows
    assert static.executed_flops > 1.5 * exact.executed_flops
    costly = sample_work(ARCH, pgs, keep, static=False, checkpointing=True, feature_caching=True, **args)
    assert costly.executed_flops == pytest.approx(exact.executed_flops * 5 / 3)
    assert forward_passes(checkpointing=False, feature_caching=False) == 3


def test_zero3_sends_three_times_the_bf16_parameters_a_step_without_accumulation():
    P, N = 1_000_000, 8
    zero3 = step_collectives(3, P, persistent=0, accum=1, feature_caching=False, features=0)
    assert bytes_per_gpu(zero3, N) == pytest.approx(3 * 2 * P * (N - 1) / N)  # gather, gather, reduce-scatter
    zero1 = step_collectives(1, P, persistent=0, accum=1, feature_caching=False, features=0)
    assert bytes_per_gpu(zero1, N) == pytest.approx(3 * 2 * P * (N - 1) / N)  # all-reduce (2x) + all-gather
    accumulating = step_collectives(3, P, persistent=0, accum=4, feature_caching=True, features=0)
    assert bytes_per_gpu(accumulating, N) == pytest.approx(4 * 4 * 2 * P * (N - 1) / N)  # 3 gathers + 1 scatter each
    zero1_accumulating = step_collectives(1, P, persistent=0, accum=4, feature_caching=True, features=0)
    assert bytes_per_gpu(zero1_accumulating, N) == bytes_per_gpu(zero1, N)  # once a step, whatever the accumulation
    assert bytes_per_gpu(zero3, 1) == 0


def test_ring_shares_and_the_fabric():
    assert Collective("all-reduce", 100, 1).sent_per_gpu(4) == 150
    assert Collective("all-gather", 100, 2).sent_per_gpu(4) == 150
    assert feature_bytes(32768, 768) == 2 * 32768 * 768 * 2
    within, across = H100_NODE.seconds(1e9, 8), H100_NODE.seconds(1e9, 16)
    assert across == pytest.approx(within * H100_NODE.nvlink / H100_NODE.network)
    assert gpu_days(86400 * 100, 100) == 1


def test_kept_share_is_measured_and_random_masking_keeps_k_max():
    vitl = get_arch("ViT-L-14")
    pgs = measured_keep(vitl, PGSConfig(min_mask_ratio=0.5))
    k_max = keep_bounds(256, 0.5, 0.1)[1]
    assert 0.1 <= pgs.kept_share(256) < k_max / 256  # photos: PGS masks beyond its minimum
    assert measured_keep(vitl, PGSConfig(masking="random", min_mask_ratio=0.5)).kept_share(256) == k_max / 256


def test_large_configs_split_their_batch_at_every_world_size():
    cfg = load_config(REPO_ROOT / "configs" / "vitl_pgs03.json")
    for n in (8, 64, 512):
        plan = plan_for(at_world(cfg, n), n)
        assert plan.micro_batch_size * plan.grad_accum_steps * n == cfg.train.global_batch_size
    work = run_work(at_world(cfg, 8), plan_for(at_world(cfg, 8), 8), Keep.uniform(100), 77)
    assert work.masked.executed_flops < work.unmasked.executed_flops  # the tail runs every patch


def test_the_script_prints_every_table_for_every_config(capsys):
    spec = importlib.util.spec_from_file_location("scaling_table", REPO_ROOT / "tools" / "scaling_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--worlds", "8", "16", "--days-world", "16"]) == 0
    out = capsys.readouterr().out
    for config in tool.CONFIGS:
        name = config.split("/")[-1].removesuffix(".json")
        assert out.count(f"| {name} |") >= 2 + 2 + 2, name  # work (2 packings), memory (2 worlds), days (2)
        assert f"### {name}: communication" in out
    for published in ("OpenCLIP ViT-L/14", "NeMo ViT-g/14"):
        assert published in out
