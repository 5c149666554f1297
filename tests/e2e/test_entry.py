"""The entry points as users start them: plain python, the deepspeed launcher's arguments, 2 ranks."""
import os
import subprocess
import sys

import pytest

from megapgs.config import REPO_ROOT


QUICK = ["--set", "eval.zeroshot=false", "--set", "eval.retrieval=false"]
# 240 training samples in 3 shards (2 for rank 0, 1 for rank 1), two steps of 2 x 128
TWO_RANKS = ["--set", "train.global_batch_size=256", "--set", "data.shard_size=100", "--set", "train.steps=2", *QUICK]


def _run(args, data_root, raw_dir, launcher=(sys.executable,), extra_env=None, timeout=300):
    cmd = [*launcher, *args, "--set", f"data.root={data_root}", "--set", f"data.fashion_mnist_dir={raw_dir}"]
    env = {**os.environ, **(extra_env or {})}
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_pretrain_runs_the_embedded_default(tmp_path, small_fashion_mnist):
    """The embedded default, shortened to 3 steps: data preparation, training, the final evaluation
    on the held-out split, a checkpoint and the summary line."""
    run_dir = tmp_path / "run"
    result = _run(["pretrain.py", "--set", "train.steps=3", "--set", f"train.output_dir={run_dir}"],
                  tmp_path / "data", small_fashion_mnist)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "Fashion-MNIST train" in out  # the progress bar
    assert "240 train samples in 1 shards" in out and "60 held-out samples" in out
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("megapgs: trained 3 steps (to step 3, 384 samples)")
    assert "zero-shot top-1" in summary and "on 60 held-out images" in summary and "skipped 0 bad samples" in summary
    assert (tmp_path / "data/fashion_mnist/train/manifest.json").is_file()
    assert (run_dir / "checkpoints/step_00000003/COMPLETE").is_file()
    assert (run_dir / "config.json").is_file() and (run_dir / "metrics.jsonl").is_file()


def test_launch_entry_takes_the_deepspeed_launcher_arguments(tmp_path, small_fashion_mnist):
    result = _run(["launch/pretrain.py", "--local_rank=0", "--config", "configs/tiny_cpu.json",
                   "--set", "train.steps=2", "--set", "pgs.masking=random", *QUICK,
                   "--set", f"train.output_dir={tmp_path / 'run'}"], tmp_path / "data", small_fashion_mnist)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "2 steps" in out and "random: keeps 34 of 49 patches" in out
    assert "megapgs: trained 2 steps" in result.stdout


@pytest.mark.parametrize("args,key_path", [
    (["--set", "optim.lr=-1"], "optim.lr"),
    (["--set", "pgs.min_mask_ratio=1"], "pgs.min_mask_ratio"),
    (["--config", "configs/vitb16_pgs03.json"], "data.train_shards"),  # its CC12M manifest is not here
])
def test_bad_input_stops_with_the_key_and_exit_2(tmp_path, small_fashion_mnist, args, key_path):
    result = _run(["pretrain.py", *args], tmp_path / "data", small_fashion_mnist)
    assert result.returncode == 2
    assert key_path in result.stderr and "Traceback" not in result.stderr


@pytest.mark.multiprocess
def test_two_ranks_under_torchrun(tmp_path, small_fashion_mnist):
    """Rank 0 of the node prepares the data while rank 1 waits at the barrier; one plan is printed."""
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533")
    result = _run(["launch/pretrain.py", *TWO_RANKS, "--set", f"train.output_dir={tmp_path / 'run'}"],
                  tmp_path / "data", small_fashion_mnist, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "256 = 128 per rank x 2 ranks x 1 accumulation" in out
    assert out.count("config valid, data ready") == 1 and result.stdout.count("megapgs: trained 2 steps") == 1


@pytest.mark.multiprocess
def test_two_ranks_under_the_deepspeed_launcher(tmp_path, small_fashion_mnist):
    """`deepspeed --num_gpus 2` on a CPU machine: gloo ranks, `--local_rank` appended by the launcher.
    (DeepSpeed's shm op is neither built nor started: megapgs/shm.py, tests/e2e/test_dev_shm.py.)"""
    launcher = (os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
                "--master_port", "29544")
    result = _run(["launch/pretrain.py", *TWO_RANKS, "--set", f"train.output_dir={tmp_path / 'run'}"],
                  tmp_path / "data", small_fashion_mnist, launcher=launcher, timeout=600,
                  extra_env={"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    out = result.stdout + result.stderr
    assert "256 = 128 per rank x 2 ranks x 1 accumulation" in out
    assert out.count("config valid, data ready") == 1 and out.count("exits successfully") == 2
    assert result.stdout.count("megapgs: trained 2 steps") == 1
