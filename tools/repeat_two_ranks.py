"""Run the 2-rank training of tests/e2e/test_train.py (synthetic data, 20 steps of 2 x 16) many times
and count how each run ended: the rate of failures that show once in a while (a rank's SIGABRT),
with the time of each run and the /dev/shm files each one left behind.

    python tools/repeat_two_ranks.py --runs 30                       # ZeRO-0, torchrun
    python tools/repeat_two_ranks.py --runs 30 --pgs --stage 3       # ..._with_pgs's run
    python tools/repeat_two_ranks.py --runs 10 --launcher deepspeed  # DeepSpeed's launcher (LOCAL_SIZE set)
    python tools/repeat_two_ranks.py --runs 30 --tree /path/to/other/checkout   # the same runs of another tree
    python tools/repeat_two_ranks.py --runs 40 --bare-gloo [--without-leave | --at-exit]   # the exit alone

--bare-gloo runs, instead of training, two gloo ranks that all-reduce 5 times and exit, through
megapgs.dist.leave_process_group called at the end (with --at-exit: from an atexit handler, as
join_process_group registers it; with --without-leave: the group left to the interpreter's
teardown): the exit that aborted now and then (megapgs/dist.py).

Each run's output is kept in OUT/run_NN.log; the last line is the summary: runs, exits by code,
aborts (a rank ended by SIGABRT or printed "terminate called"), median seconds a run (launch to
exit), median step time (steps 2-20, from metrics.jsonl), and the /dev/shm files left after the runs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SYNTHETIC = ["--set", "data.source=synthetic", "--set", "train.steps=20", "--set", "optim.warmup_steps=5",
             "--set", "train.global_batch_size=32", "--set", "optim.lr=1e-3", "--set", "train.micro_batch_size=16",
             "--set", "eval.zeroshot=false", "--set", "eval.retrieval=false", "--set", "log.every_steps=1",
             "--set", "log.tensorboard=false", "--set", "log.progress=false"]
ABORTED = re.compile(r"terminate called|exitcode\s*:\s*-6|SIGABRT|exits with return code = -6")


def mean_step_ms(run_dir: Path) -> float | None:
    """The mean step time of steps 2..N from metrics.jsonl (step 1 carries the warm-up)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return None
    steps = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    times = [r["step_ms"] for r in steps if r.get("kind") == "train" and r["step"] > 1 and "step_ms" in r]
    return statistics.mean(times) if times else None


BARE_GLOO = ("import torch, torch.distributed as dist\n"
             "from megapgs.dist import leave_process_group\n"
             "dist.init_process_group('gloo')\n"
             "x = torch.ones(1000)\n"
             "for _ in range(5):\n"
             "    dist.all_reduce(x)\n"
             "{leave}\n")


def command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    bin_dir = os.path.dirname(sys.executable)
    if args.bare_gloo:
        script = run_dir.parent / "bare_gloo.py"
        leave = ("" if args.without_leave else
                 "import atexit; atexit.register(leave_process_group)" if args.at_exit else "leave_process_group()")
        script.write_text(BARE_GLOO.format(leave=leave))
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(args.port), str(script)]
    if args.launcher == "deepspeed":
        launch = [os.path.join(bin_dir, "deepspeed"), "--num_gpus", "2", "--master_port", str(args.port)]
    else:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                  "--master_port", str(args.port)]
    masking = ["--set", "pgs.masking=pgs", "--set", "pgs.rng=sample", "--set", "pgs.unmasked_tail=0"] if args.pgs \
        else ["--set", "pgs.masking=none"]
    stage = ["--set", f'deepspeed={{"zero_optimization": {{"stage": {args.stage}}}}}']
    return [*launch, "launch/pretrain.py", *SYNTHETIC, *masking, *stage, "--set", f"train.output_dir={run_dir}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--stage", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO stage")
    parser.add_argument("--pgs", action="store_true", help="PGS masking keyed by sample (the _with_pgs test)")
    parser.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    parser.add_argument("--port", type=int, default=29631, help="master port")
    parser.add_argument("--tree", type=Path, default=REPO_ROOT, help="the checkout whose launch/pretrain.py runs")
    parser.add_argument("--out", type=Path, default=None, help="where logs and run folders go (default: a temp dir)")
    parser.add_argument("--bare-gloo", action="store_true", help="run two gloo ranks that all-reduce and exit")
    parser.add_argument("--without-leave", action="store_true", help="with --bare-gloo: exit without leaving the group")
    parser.add_argument("--at-exit", action="store_true",
                        help="with --bare-gloo: leave from an atexit handler, as join_process_group registers it")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="megapgs-repeat-"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": str(args.tree)}
    shm_before = set(os.listdir("/dev/shm"))
    codes: Counter[int] = Counter()
    aborts, seconds, training = 0, [], []
    for i in range(1, args.runs + 1):
        run_dir = out / f"run_{i:02d}"
        started = time.perf_counter()
        result = subprocess.run(command(args, run_dir), cwd=args.tree, env=env, capture_output=True, text=True)
        seconds.append(time.perf_counter() - started)
        log = result.stdout + result.stderr
        (out / f"run_{i:02d}.log").write_text(log)
        codes[result.returncode] += 1
        aborted = bool(ABORTED.search(log))
        aborts += aborted
        step_ms = mean_step_ms(run_dir)
        if step_ms is not None:
            training.append(step_ms)
        print(f"run {i:2d}: exit {result.returncode}{' ABORT' if aborted else ''}, {seconds[-1]:.1f} s", flush=True)
    left = sorted(set(os.listdir("/dev/shm")) - shm_before)
    how = "without" if args.without_leave else "atexit" if args.at_exit else "with"
    what = (f"bare gloo exit, {how} leave_process_group" if args.bare_gloo
            else f"{args.launcher}, ZeRO-{args.stage}{', PGS' if args.pgs else ''}")
    print(f"{args.runs} runs ({what}, tree {args.tree}): "
          f"exits {dict(sorted(codes.items()))}, aborts {aborts}/{args.runs}, median {statistics.median(seconds):.1f} s "
          f"a run (min {min(seconds):.1f}, max {max(seconds):.1f})"
          + (f", median step {statistics.median(training):.0f} ms" if training else "")
          + f"; /dev/shm files left: {len(left)}" + (f" ({', '.join(left[:4])}{', ...' if len(left) > 4 else ''})"
                                                     if left else "") + f"; logs in {out}")
    return 0 if aborts == 0 and set(codes) == {0} else 1


if __name__ == "__main__":
    sys.exit(main())
