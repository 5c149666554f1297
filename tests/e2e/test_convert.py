"""Issue 7, acceptance 2: a ZeRO-3 checkpoint of a 2-rank run converts to an OpenCLIP model
directory, and its embeddings match those of the same run on 1 rank."""
import subprocess
import sys

import open_clip
import pytest
import torch

from megapgs.config import REPO_ROOT

RUN = ["launch/pretrain.py", "--set", "data.source=synthetic", "--set", "pgs.masking=none", "--set", "train.steps=3",
       "--set", "train.global_batch_size=32", "--set", "eval.zeroshot=false", "--set", "eval.retrieval=false",
       "--set", "log.progress=false", "--set", 'deepspeed={"zero_optimization": {"stage": 3}}']


def run(cmd, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


@pytest.mark.multiprocess
def test_zero3_two_rank_checkpoint_converts_and_matches_one_rank(tmp_path):
    embeddings = {}
    for ranks, micro in ((1, 32), (2, 16)):
        launcher = [sys.executable] if ranks == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29581"]
        run_dir, out = tmp_path / f"run{ranks}", tmp_path / f"openclip{ranks}"
        run([*launcher, *RUN, "--set", f"train.micro_batch_size={micro}", "--set", f"train.output_dir={run_dir}"])
        result = run([sys.executable, "tools/convert_to_openclip.py", str(run_dir), str(out)])
        assert "parity: tiny-28" in result.stdout and (out / "open_clip_model.safetensors").is_file()
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
        model.eval()
        images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
        tokens = open_clip.get_tokenizer("ViT-B-32", context_length=16)(["a photo of a bag.", "a coat", "shoes"])
        with torch.no_grad():
            embeddings[ranks] = (model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True))
    for one, two in zip(embeddings[1], embeddings[2]):
        assert float((one - two).norm() / one.norm()) <= 1e-4


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "tools/convert_to_openclip.py", str(tmp_path), str(tmp_path / "out")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no complete megapgs checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_siglip_run_converts_both_ways(tmp_path):
    """A SigLIP-trained run keeps its logit_bias through megapgs -> OpenCLIP -> megapgs."""
    from safetensors.torch import load_file

    from megapgs.convert.checkpoint import read_checkpoint

    run_dir, out, back = tmp_path / "run", tmp_path / "openclip", tmp_path / "init"
    run([sys.executable, *RUN, "--set", "train.loss=siglip", "--set", "train.micro_batch_size=32",
         "--set", f"train.output_dir={run_dir}"])
    result = run([sys.executable, "tools/convert_to_openclip.py", str(run_dir), str(out)])
    assert "parity: tiny-28" in result.stdout
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    trained, _ = read_checkpoint(run_dir)
    assert float(model.logit_bias.detach()) == float(trained["logit_bias"]) != -10.0  # trained, not the initial value
    run([sys.executable, "tools/convert_from_openclip.py", f"local-dir:{out}", str(back)])
    init = load_file(back / "model.safetensors")
    assert init.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(init[key], value), key
