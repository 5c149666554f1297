"""train.init_from end to end: OpenCLIP weights -> tools/convert_from_openclip.py -> a ZeRO-3 training
step that changes no weight -> tools/convert_to_openclip.py gives back the OpenCLIP state dict bit for
bit, on 1 and 2 ranks. A resumed run does not read init_from; a wrong arch stops the run, naming the key."""
import json
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from megapgs.convert.openclip import build_openclip_model, openclip_model_cfg
from megapgs.models.archs import get_arch
from tests.e2e.runs import run, words

# optim.lr must be > 0, and warmup's first step runs at lr / warmup_steps, not 0. At lr = 1e-50 AdamW's
# update (lr / (1 - beta1)) * m / (sqrt(v) + eps) underflows to 0 in fp32 and its decay factor
# 1 - lr * wd rounds to 1: the step runs (forward, backward, ZeRO-3 partitions) and changes no weight.
RUN = ["launch/pretrain.py", "--set", "data.source=synthetic", "--set", "pgs.masking=none", "--set", "train.steps=1",
       "--set", "train.global_batch_size=16", "--set", "eval.zeroshot=false", "--set", "eval.retrieval=false",
       "--set", "log.progress=false", "--set", "optim.lr=1e-50", "--set", "optim.warmup_steps=0",
       "--set", 'deepspeed={"zero_optimization": {"stage": 3}}']
TWO_RANKS = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29587"]


def write_openclip_dir(folder, state, model_cfg):
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(the OpenCLIP state dict, the megapgs initial checkpoint tools/convert_from_openclip.py made of it)."""
    root = tmp_path_factory.mktemp("init_from")
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in build_openclip_model(get_arch("tiny-28")).state_dict().items()}
    folder = write_openclip_dir(root / "openclip", state, openclip_model_cfg(get_arch("tiny-28")))
    result = run([sys.executable, "tools/convert_from_openclip.py", f"local-dir:{folder}", str(root / "init")])
    assert "parity: tiny-28" in result.stdout and "wrote" in result.stdout
    return state, root / "init"


@pytest.fixture(scope="module")
def one_rank_run(converted, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "run1"
    result = run([sys.executable, *RUN, "--set", "train.micro_batch_size=16", "--set", f"train.output_dir={run_dir}",
                  "--set", f"train.init_from={converted[1]}"])
    assert "initial weights: tiny-28 from" in words(result)
    return run_dir


def assert_converts_back_to(run_dir, out, original) -> None:
    run([sys.executable, "tools/convert_to_openclip.py", str(run_dir), str(out)])
    back = load_file(out / "open_clip_model.safetensors")
    assert back.keys() == original.keys()
    for key, value in original.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_one_rank_step_at_zero_lr_gives_back_the_openclip_weights(converted, one_rank_run, tmp_path):
    assert_converts_back_to(one_rank_run, tmp_path / "openclip", converted[0])


@pytest.mark.multiprocess
def test_two_rank_zero3_step_at_zero_lr_gives_back_the_openclip_weights(converted, tmp_path):
    run_dir = tmp_path / "run2"
    result = run([*TWO_RANKS, *RUN, "--set", "train.micro_batch_size=8", "--set", f"train.output_dir={run_dir}",
                  "--set", f"train.init_from={converted[1]}"])
    assert "initial weights: tiny-28 from" in words(result)
    # issue 15, item 6: built partitioned (zero.Init), the weights loaded into the shards
    held = re.search(r"([\d,]+) parameters, 2 rank\(s\); built partitioned \(zero.Init\): this rank holds ([\d,]+)",
                     words(result))
    assert held, words(result)[-2000:]
    whole, own = (int(group.replace(",", "")) for group in held.groups())
    assert whole / 2 <= own < whole / 2 + 2 * 1024 * 200  # half, plus DeepSpeed's per-tensor padding
    assert_converts_back_to(run_dir, tmp_path / "openclip", converted[0])


def test_resume_takes_precedence_over_init_from(one_rank_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(one_rank_run, run_dir)
    result = run([sys.executable, *RUN, "--set", "train.steps=2", "--set", "train.micro_batch_size=16",
                  "--set", f"train.output_dir={run_dir}", "--set", "train.resume=auto",
                  "--set", f"train.init_from={tmp_path / 'not_there'}"])  # never read: the run resumes
    assert "train.init_from not read: resuming from" in words(result)
    assert "initial weights" not in words(result)
    assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE").is_file()


def test_init_from_of_another_arch_stops_the_run(converted, tmp_path):
    result = run([sys.executable, *RUN, "--set", "train.micro_batch_size=16", "--set", "model.arch=tiny-32",
                  "--set", f"train.output_dir={tmp_path / 'run'}", "--set", f"train.init_from={converted[1]}"],
                 ok=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr  # refused before data and engine
    assert "train.init_from=" in words(result) and "holds tiny-28 weights but model.arch is 'tiny-32'" in words(result)


def test_converter_refuses_an_unsupported_option_without_writing(converted, tmp_path):
    state, _ = converted
    quick_gelu = {**openclip_model_cfg(get_arch("tiny-28")), "quick_gelu": True}
    folder = write_openclip_dir(tmp_path / "openclip", state, quick_gelu)
    result = run([sys.executable, "tools/convert_from_openclip.py", str(folder), str(tmp_path / "out")], ok=False)
    assert result.returncode == 2 and "error:" in result.stderr and "model_cfg.quick_gelu = true" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
