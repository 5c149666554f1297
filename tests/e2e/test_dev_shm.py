"""Issue 15, item 8: a 2-rank run under DeepSpeed's launcher (which exports LOCAL_SIZE, the setting
that makes DeepSpeed's shm op create a 69 MB /dev/shm buffer per rank) leaves nothing in /dev/shm,
whether it ends or is killed with SIGKILL; the next run removes what dead runs left there and
nothing a live process uses."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megapgs.config import REPO_ROOT

PORT = 29621
SHM = Path("/dev/shm")
RUN = ["--set", "data.source=synthetic", "--set", "pgs.masking=none", "--set", "train.global_batch_size=32",
       "--set", "train.micro_batch_size=16", "--set", "eval.zeroshot=false", "--set", "eval.retrieval=false",
       "--set", "log.progress=false", "--set", "log.tensorboard=false", "--set", "log.every_steps=1"]
HOLD = ("import mmap, sys, time\n"
        "fh = open(sys.argv[1], 'r+b'); view = mmap.mmap(fh.fileno(), 0)\n"
        "print('mapped', flush=True); time.sleep(600)\n")


def launcher(run_dir: Path, steps: int) -> list[str]:
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [deepspeed, "--num_gpus", "2", "--master_port", str(PORT), "launch/pretrain.py", *RUN,
            "--set", f"train.steps={steps}", "--set", f"train.output_dir={run_dir}"]


def env() -> dict[str, str]:
    return {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


def files_of_this_port() -> list[str]:
    return sorted(name for name in os.listdir(SHM) if name.endswith((f"_{PORT}_0", f"_{PORT}_1")))


def trained_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if line.endswith("}") and
               json.loads(line)["kind"] == "train")


@pytest.mark.multiprocess
def test_runs_under_the_deepspeed_launcher_leave_nothing_in_dev_shm(tmp_path):
    uid = os.getuid()
    dead = [SHM / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_{PORT}_0", SHM / "sem.mp-megapgs-test-dead"]
    live = SHM / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_{PORT + 1}_0"
    for path in [*dead, live]:
        path.write_bytes(b"\0" * 4096)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mapped"

        killed_dir = tmp_path / "killed"  # killed with SIGKILL after its first step: no handler runs
        proc = subprocess.Popen(launcher(killed_dir, steps=10_000), cwd=REPO_ROOT, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while trained_steps(killed_dir) < 1 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            swept = not any(p.exists() for p in dead)  # the run's first rank removed what dead runs left
            created = files_of_this_port()  # the ranks are past DeepSpeed's start: anything it made is there
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert trained_steps(killed_dir) >= 1, "the run never trained a step"
        assert swept and created == [] and files_of_this_port() == []

        ended = subprocess.run(launcher(tmp_path / "ended", steps=2), cwd=REPO_ROOT, env=env(), capture_output=True,
                               text=True, timeout=600)
        assert ended.returncode == 0, (ended.stdout + ended.stderr)[-3000:]
        assert "megapgs: trained 2 steps" in ended.stdout
        assert files_of_this_port() == [] and live.exists()  # what a live process maps stays
    finally:
        holder.kill()
        holder.wait()
        for path in [*dead, live]:
            path.unlink(missing_ok=True)
