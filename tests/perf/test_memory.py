"""The dry run and its memory model (megapgs/perf/): fast, no training run (tools/measure_memory.py
holds the estimates to measured peaks; BENCHMARKS.md has the figures)."""
from __future__ import annotations

import json

import pytest
import torch

from megapgs import entry
from megapgs.config import REPO_ROOT, load_config
from megapgs.data.shards import UNCHECKED_FORMAT
from megapgs.models.archs import get_arch
from megapgs.models.blocks import Block, Transformer
from megapgs.models.clip import CLIP
from megapgs.packed import Packed
from megapgs.perf.activations import Stream, TowerShape, block_saved, logits_bytes, tower_activations
from megapgs.perf.dry_run import estimate_for
from megapgs.perf.param_count import count_params
from megapgs.perf.zero_memory import ZeroSettings, held_as, start_up_terms, zero_terms

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.json"))


@pytest.fixture
def no_training(monkeypatch):
    """Everything a dry run must not do fails the test when it is done."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the dry run built a model, started DeepSpeed or joined a process group")

    import deepspeed

    import megapgs.data.prepare
    import megapgs.data.shard_index
    import megapgs.models.clip
    import megapgs.train.engine

    monkeypatch.setattr(megapgs.models.clip.CLIP, "__init__", forbidden)
    monkeypatch.setattr(megapgs.models.clip, "build_model", forbidden)
    monkeypatch.setattr(megapgs.train.engine, "build_model", forbidden)
    monkeypatch.setattr(megapgs.train.engine, "build_engine", forbidden)
    monkeypatch.setattr(deepspeed, "initialize", forbidden)
    monkeypatch.setattr(entry, "init_distributed", forbidden)
    monkeypatch.setattr(entry, "train", forbidden)
    monkeypatch.setattr(entry, "prepare_data", forbidden)  # it writes the embedded default's shards
    monkeypatch.setattr(megapgs.data.prepare, "prepare_data", forbidden)
    monkeypatch.setattr(megapgs.data.shard_index, "index_shards", forbidden)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_dry_run_prints_every_config_without_building_a_model(config, no_training, capsys, tmp_path):
    world = 1 if "tiny" in config.stem else 8
    code = entry.main(["--config", str(config), "--dry-run", "--world-size", str(world),
                       "--set", f"train.output_dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert code == 0
    for row in ("model", "batch", "contrastive", "engine", "world", "per rank", "shards per rank", "ZeRO",
                "parameters", "memory per rank", "parameters", "optimizer state", "activations",
                "contrastive logits", "forward/backward", "optimizer step", "peak per rank", "checkpointing"):
        assert row in out, row
    assert f"{world} ranks" in out
    assert not (tmp_path / "run").exists()  # nothing written


def test_dry_run_counts_shards_per_rank_from_the_manifest(no_training, capsys, tmp_path):
    shards = []
    for i in range(10):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"not a tar: a dry run never opens it")
        shards.append({"path": f"{i:05d}.tar", "samples": 100})
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"format": UNCHECKED_FORMAT, "samples": 1000, "shards": shards}))
    args = ["--config", str(REPO_ROOT / "configs" / "vitb16_pgs03.json"), "--dry-run", "--world-size", "4",
            "--set", f"data.train_shards={manifest}", "--set", "data.resampled=false",
            "--set", "train.micro_batch_size=256"]
    assert entry.main(args) == 0
    out = capsys.readouterr().out
    assert "2 or 3 of 10 shards" in out
    assert "1,000 train samples in 10 shards" in out
    assert "8 steps (~32.77 epochs)" in out  # 32 epochs of the manifest's 1,000 samples, batch 4,096

    missing = ["--config", str(REPO_ROOT / "configs" / "vitl_pgs03.json"), "--dry-run", "--world-size", "64",
               "--set", f"data.train_shards={tmp_path / 'nowhere.json'}"]
    assert entry.main(missing) == 0
    out = capsys.readouterr().out
    assert "unknown:" in out and "nowhere.json" in out


def test_dry_run_refuses_a_world_the_batch_does_not_split_over(no_training, capsys):
    assert entry.main(["--dry-run", "--world-size", "3"]) == 2  # 128 is not a multiple of 128 x 3
    assert "global_batch_size" in capsys.readouterr().err


@pytest.mark.parametrize("arch", sorted({load_config(c).model.arch for c in CONFIGS} | {"tiny-32"}))
@pytest.mark.parametrize("siglip", [False, True])
def test_analytic_parameters_are_the_built_models(arch, siglip):
    spec = get_arch(arch)
    with torch.device("meta"):  # shapes only: ViT-H's 986 M parameters take no memory
        model = CLIP(spec, init_logit_bias=-10.0) if siglip else CLIP(spec)
    counts, tensors = count_params(spec, siglip=siglip)
    built = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert {t.name: t.shape for t in tensors} == built
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.vision == sum(p.numel() for p in model.visual.parameters())
    assert counts.text == sum(p.numel() for p in model.text.parameters())
    assert counts.largest_block == max(sum(p.numel() for p in block.parameters())
                                       for tower in (model.visual, model.text) for block in tower.transformer.resblocks)


def _settings(stage: int, **kw) -> ZeroSettings:
    values = dict(stage=stage, reduce_bucket_size=5000, prefetch_bucket_size=100, param_persistence_threshold=10,
                  max_reuse_distance=10**9, overlap_comm=True, contiguous_gradients=True, reduce_scatter=True,
                  offload=False)
    return ZeroSettings(**{**values, **kw})


def test_zero_partitioning_on_a_hand_checked_case():
    """1000 parameters (a 30-element block, tensors of 900, 60, 30 and 10) on 4 ranks, bf16 (c = 2)
    with fp32 accumulation (g = 4): each byte count below worked out by hand."""
    from megapgs.perf.param_count import ParamTensor

    tensors = [ParamTensor("big", (30, 30)), ParamTensor("mid", (60,)), ParamTensor("x.resblocks.0.w", (6, 5)),
               ParamTensor("small", (10,))]
    P = sum(t.numel for t in tensors)
    assert P == 1000

    def sizes(stage, N, c, g, device="cuda", **kw):
        return {t.name: t.bytes for t in zero_terms(P, tensors, 30, _settings(stage, **kw), N, c, g, device)}

    # ZeRO-3: partition 250; "small" (10 <= threshold 10) stays whole: 10 x 2 B
    assert sizes(3, 4, 2, 4) == {
        "parameters": 250 * 2 + 10 * 2, "master weights": 250 * 4, "optimizer state": 2 * 4 * 250,
        "gradients": 250 * 4, "reduce bucket": 5000 * 2,   # a GPU allocates the whole bucket
        "reduce buffer": 1000 * 2 + 250 * 4,               # the concatenated gradients, the fp32 partition
        "gathered parameters": 990 * 2,                    # everything but the persistent 10, reuse distance 1e9
        "step: flat gradients": 250 * 4}
    # a short reuse distance keeps reuse distance + prefetch + a block gathered
    assert sizes(3, 4, 2, 4, max_reuse_distance=50)["gathered parameters"] == (50 + 100 + 30) * 2
    # on the CPU only the bucket's written pages count, and gloo's reduce-scatter takes a second copy
    cpu = sizes(3, 4, 4, 4, device="cpu")
    assert cpu["reduce bucket"] == 1000 * 4 and cpu["reduce buffer"] == 2 * 1000 * 4
    assert cpu["master weights"] == 250 * 4  # a copy even in fp32
    # ZeRO-0 in fp32 on 2 ranks: everything whole, the flattened all-reduce buffer
    assert sizes(0, 2, 4, 4) == {"parameters": 4000, "gradients": 4000, "optimizer state": 8000,
                                 "reduce buffer": 4000}
    # ZeRO-1: whole parameters and gradients, partitioned master weights and moments
    assert sizes(1, 4, 2, 4) == {"parameters": 2000, "master weights": 1000, "optimizer state": 2000,
                                 "gradients": 4000, "reduce buffer": 2000, "step: flat gradients": 1000}
    # ZeRO-2: the partitioned gradients and two buckets with overlap_comm
    two = sizes(2, 4, 2, 4)
    assert two["gradients"] == 1000 and two["reduce buckets"] == 2 * 5000 * 2

    # start-up: built whole in fp32 (4000 B), or under zero.Init each rank's shards (900, 60 and 30 in
    # quarters rounded up, the persistent 10 whole) and the largest module (the 900) whole for its init
    def start(stage, c, partitioned):
        return {t.name: t.bytes for t in start_up_terms(tensors, _settings(stage), c, 4, partitioned)}

    assert start(3, 2, False) == {"start-up model": 4000}
    assert start(3, 2, True) == {"start-up model": (225 + 15 + 8 + 10) * 4, "start-up: a module whole": 900 * 4}
    assert start(0, 4, True) == {}  # ZeRO-0 in fp32 trains the model as built


def test_block_activations_are_what_autograd_saves():
    """block_saved's count against the bytes autograd actually keeps for backward (saved-tensor
    hooks, each storage once, parameters left out), on ragged packed rows through sdpa_padded."""
    torch.manual_seed(0)
    D, M, H, lengths = 64, 256, 2, [10, 7, 13, 4]
    packed, T = Packed.from_lengths(lengths), sum(lengths)
    stream = Stream(T, len(lengths), max(lengths))

    def saved_bytes(run, module) -> int:
        params = {p.data_ptr() for p in module.parameters()}
        storages: dict[int, int] = {}

        def pack(t):
            if t.data_ptr() not in params and t.numel():
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(torch.randn(T, D, requires_grad=True))
        return sum(storages.values())

    block = Block(D, H, M)
    measured = saved_bytes(lambda x: block(x, packed, False, "sdpa_padded"), block)
    assert measured == pytest.approx(block_saved(TowerShape(D, M, H, 1), stream, 4, varlen=False), rel=0.02)

    tower = Transformer(D, 3, H, M, causal=False)
    tower.backend = "sdpa_padded"
    measured = saved_bytes(lambda x: tower(x, packed), tower)
    assert measured == pytest.approx(tower_activations(TowerShape(D, M, H, 3), stream, 4, False, False), rel=0.02)
    tower.grad_checkpointing = True  # forward keeps each block's input; backward recomputes one block
    measured = saved_bytes(lambda x: tower(x, packed), tower)
    assert measured == 3 * T * D * 4
    assert tower_activations(TowerShape(D, M, H, 3), stream, 4, False, True) == measured + block_saved(
        TowerShape(D, M, H, 1), stream, 4, False)


def test_logits_count_the_square_only_without_local_loss():
    assert logits_bytes("clip", local_loss=True, rows=4, columns=16) == 8 * 4 * 16 * 4
    assert logits_bytes("clip", local_loss=False, rows=4, columns=16) == 6 * 16 * 16 * 4
    assert logits_bytes("clip", local_loss=False, rows=16, columns=16) == 8 * 16 * 16 * 4  # one rank


def test_cpu_peak_keeps_the_heap_and_adds_the_largest_mapped_transient():
    """tiny-28 on the CPU: its transients are heap-sized, so the peak is the states plus the largest
    phase; ViT-B-16 under ZeRO-0 on 2 ranks adds its mapped all-reduce buffer to the heap's peak."""
    tiny = estimate_for(load_config(None), world_size=1, device="cpu")
    assert tiny.peak_bytes == tiny.phase_bytes("forward/backward")
    vitb = load_config(REPO_ROOT / "configs" / "vitb16_pgs03.json", [
        'deepspeed={"zero_optimization": {"stage": 0}}', "train.micro_batch_size=8", "train.global_batch_size=16"])
    two = estimate_for(vitb, world_size=2, device="cpu")
    assert two.terms["reduce buffer"].held == held_as(two.terms["reduce buffer"].bytes) == "mapped"
    assert two.peak_bytes == two.phase_bytes("forward/backward") + two.terms["reduce buffer"].bytes
    on_gpu = estimate_for(vitb, world_size=2, device="cuda")  # the caching allocator reuses: the largest phase
    assert on_gpu.peak_bytes == max(on_gpu.phase_bytes(p) for p in on_gpu.phases)


def test_checkpointing_moves_the_peak_by_the_activations():
    cfg = load_config(REPO_ROOT / "configs" / "vitl_pgs03.json", ["model.grad_checkpointing=true"])
    estimate = estimate_for(cfg, world_size=64, device="cuda")
    assert estimate.checkpointing and estimate.other_activations > 5 * estimate.terms["activations"].bytes
    assert estimate.peak_with_other_checkpointing() > estimate.peak_bytes
