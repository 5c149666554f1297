"""Issue 16, acceptance 2 and 4: model.arch takes an OpenCLIP model-config name (ViT-M-16) or a
model-config JSON and trains 5 steps on the CPU; the JSON run converts to OpenCLIP and back; an
option megapgs does not compute stops the run naming it; a tiny model trained at 28 px continues
at 56 px from train.init_from, its positional embeddings interpolated."""
import json
import math
import sys

import open_clip
import torch
from safetensors.torch import load_file

from megapgs.convert.checkpoint import read_checkpoint
from megapgs.convert.openclip import openclip_model_cfg
from megapgs.models.archs import get_arch
from tests.e2e.runs import run, words

RUN = [sys.executable, "launch/pretrain.py", "--set", "data.source=synthetic", "--set", "eval.zeroshot=false",
       "--set", "eval.retrieval=false", "--set", "log.progress=false", "--set", "log.every_steps=1"]
# Numbers no named arch has: 32 px / 8 px patches, 3 heads of 32, mlp_ratio 3, a 1-layer text tower.
CUSTOM = {"embed_dim": 40, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 96, "layers": 2,
                                          "head_width": 32, "mlp_ratio": 3.0},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 1}}


def train_losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row["kind"] == "train"]


def assert_trained(result, run_dir, steps: int) -> None:
    assert f"megapgs: trained {steps} steps (to step {steps}," in words(result)
    assert (run_dir / "checkpoints" / f"step_{steps:08d}" / "COMPLETE").is_file()
    losses = train_losses(run_dir)
    assert len(losses) == steps and all(math.isfinite(loss) for loss in losses), losses


def test_openclip_model_config_name_trains_five_steps(tmp_path):
    """ViT-M-16 at 224 px on 2 cores: batch 2, random masking keeping 15% of the patches, to stay fast."""
    run_dir = tmp_path / "run"
    result = run([*RUN, "--set", "model.arch=ViT-M-16", "--set", "train.steps=5",
                  "--set", "train.global_batch_size=2", "--set", "train.micro_batch_size=2",
                  "--set", "pgs.masking=random", "--set", "pgs.min_mask_ratio=0.85", "--set", "pgs.unmasked_tail=0",
                  "--set", f"train.output_dir={run_dir}"])
    assert "ViT-M-16 (embed 512, vision 12x512, text 12x512)" in words(result)
    assert_trained(result, run_dir, 5)
    assert json.loads((run_dir / "config.json").read_text())["model"]["arch"] == "ViT-M-16"


def test_model_config_json_trains_five_steps_and_converts_both_ways(tmp_path):
    arch, run_dir, out, back = tmp_path / "custom.json", tmp_path / "run", tmp_path / "openclip", tmp_path / "init"
    arch.write_text(json.dumps(CUSTOM))
    result = run([*RUN, "--set", f"model.arch={arch}", "--set", "train.steps=5", "--set", "train.global_batch_size=8",
                  "--set", "train.micro_batch_size=8", "--set", f"train.output_dir={run_dir}"])
    assert "(embed 40, vision 2x96, text 1x48)" in words(result)  # the header (rich cuts the long path)
    assert_trained(result, run_dir, 5)

    to_openclip = run([sys.executable, "tools/convert_to_openclip.py", str(run_dir), str(out)])
    assert f"parity: {arch} from" in to_openclip.stdout  # the tool fails above 1e-5
    model_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    assert model_cfg == openclip_model_cfg(get_arch(str(arch)))
    theirs = open_clip.create_model(f"local-dir:{out}").eval()
    assert theirs.visual.positional_embedding.shape == (1 + 4 * 4, 96)

    from_openclip = run([sys.executable, "tools/convert_from_openclip.py", f"local-dir:{out}", str(back)])
    assert "parity: " in from_openclip.stdout
    trained, _ = read_checkpoint(run_dir)
    init = load_file(back / "model.safetensors")
    assert init.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(init[key], value), key


def test_an_option_megapgs_does_not_compute_stops_the_run_naming_it(tmp_path):
    arch = tmp_path / "quickgelu.json"
    arch.write_text(json.dumps({**CUSTOM, "quick_gelu": True}))
    for value, phrase in ((arch, f"model.arch: {arch}: model_cfg.quick_gelu = true (QuickGELU"),
                          ("ViT-M-16-alt", ("model.arch: OpenCLIP's ViT-M-16-alt config: model_cfg.vision_cfg."
                                            "ls_init_value = 0.0001 (LayerScale)"))):
        result = run([*RUN, "--set", f"model.arch={value}", "--set", f"train.output_dir={tmp_path / 'run'}"], ok=False)
        assert result.returncode == 2 and phrase in words(result), words(result)[-2000:]
        assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_tiny_model_trained_at_28_px_continues_at_56_px(tmp_path):
    """FLIP's and CLIPA's resolution change: the weights of a 7x7-grid run initialise a 14x14-grid run."""
    tiny = openclip_model_cfg(get_arch("tiny-28"))
    arch56 = tmp_path / "tiny56.json"
    arch56.write_text(json.dumps({**tiny, "vision_cfg": {**tiny["vision_cfg"], "image_size": 56}}))
    small, large = tmp_path / "run28", tmp_path / "run56"
    batch = ["--set", "train.global_batch_size=16", "--set", "train.micro_batch_size=16"]
    # another seed than the 56 px run's: its fresh weights would be far from these
    assert_trained(run([*RUN, *batch, "--set", "train.steps=3", "--set", "train.seed=7",
                        "--set", f"train.output_dir={small}"]), small, 3)
    result = run([*RUN, *batch, "--set", "train.steps=3", "--set", f"model.arch={arch56}",
                  "--set", f"train.init_from={small}", "--set", f"train.output_dir={large}"])
    assert "initial weights: tiny-28 from" in words(result)  # rich wraps the path
    assert "tensors); image positional embeddings interpolated from 7x7 (28 px) to 14x14 (56 px)" in words(result)
    assert_trained(result, large, 3)
    before, after = read_checkpoint(small)[0], read_checkpoint(large)[0]
    assert after["visual.positional_embedding"].shape == (1 + 14 * 14, 96)
    # continued from the 28 px weights, not from a fresh draw: three small steps away from them
    for key in ("visual.conv1.weight", "text.token_embedding.weight", "visual.transformer.resblocks.0.mlp.c_fc.weight"):
        assert float((after[key] - before[key]).norm() / before[key].norm()) < 0.1, key
