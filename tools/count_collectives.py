"""Count the bytes a real 2-rank run passes to torch.distributed's collectives per optimizer step,
beside what megapgs/perf/comm.py predicts for it.

    python tools/count_collectives.py                       # ZeRO-1 and ZeRO-3, tiny-32, CPU (gloo)
    python tools/count_collectives.py --stages 3 --accum 4

Each case runs `launch/pretrain.py` twice under torch.distributed.run (2 ranks, bf16 with fp32
gradient accumulation, synthetic data, no masking, the loss over the global batch), for S and S + 1
steps; the difference is one optimizer step in its steady state (the first step records ZeRO-3's trace).
Buffers are counted whole: an all-gather's output, a reduce-scatter's input, an all-reduce's tensor.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OPS = {"all_reduce": ("tensor", "all-reduce"), "all_gather_into_tensor": ("output_tensor", "all-gather"),
       "all_gather": ("tensor_list", "all-gather"), "reduce_scatter_tensor": ("input", "reduce-scatter"),
       "reduce_scatter": ("input_list", "reduce-scatter"), "broadcast": ("tensor", "broadcast")}


def _count_and_run(argv: list[str]) -> int:
    """In a rank: wrap the collectives, run the entry point, print rank 0's totals at exit."""
    import atexit
    import inspect

    import torch
    import torch.distributed as dist

    totals: collections.Counter = collections.Counter()

    def size(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        return sum(size(y) for y in x) if isinstance(x, (list, tuple)) else 0

    def wrapped(name: str, arg: str, op: str):
        fn = getattr(dist, name)
        signature = inspect.signature(fn)

        def counted(*args, **kwargs):
            totals[op] += size(signature.bind_partial(*args, **kwargs).arguments.get(arg))
            return fn(*args, **kwargs)
        return counted

    for name, (arg, op) in OPS.items():
        setattr(dist, name, wrapped(name, arg, op))
    if os.environ.get("RANK") == "0":
        atexit.register(lambda: print("COLLECTIVES " + json.dumps(totals), flush=True))
    from megapgs.entry import main
    return main(argv)


def run_case(stage: int, steps: int, accum: int, port: int) -> dict[str, int]:
    ds = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"stage": stage}}
    out = tempfile.mkdtemp(prefix="count-collectives-")
    sets = ["model.arch=tiny-32", "data.source=synthetic", f"train.steps={steps}", f"train.global_batch_size={4 * accum}",
            "train.micro_batch_size=2", "pgs.masking=none", "eval.zeroshot=false", "eval.retrieval=false",
            "train.checkpoint_every=0", "log.progress=false", "log.tensorboard=false", f"train.output_dir={out}",
            "deepspeed=" + json.dumps(ds)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           __file__, "--in-rank", *[x for s in sets for x in ("--set", s)]]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("COLLECTIVES ")]
    if proc.returncode or not lines:
        sys.exit(f"run failed (stage {stage}, {steps} steps):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per step (2 ranks x 2 samples each)")
    parser.add_argument("--steps", type=int, default=2, help="S: the runs take S and S + 1 steps")
    args = parser.parse_args(argv)

    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from megapgs.models.archs import get_arch
    from megapgs.perf.comm import feature_bytes, step_collectives
    from megapgs.perf.param_count import count_params

    arch = get_arch("tiny-32")
    counts, tensors = count_params(arch)
    persistent = counts.persistent(tensors, DeepSpeedZeroConfig().param_persistence_threshold)
    print(f"tiny-32: {counts.total:,} parameters ({persistent:,} persistent under ZeRO-3); 2 ranks, "
          f"{args.accum} micro-batches a step, the loss over the global batch (feature cache)")
    print(f"{'ZeRO':>4}  {'op':<15}{'measured B/step':>16}{'predicted':>12}{'x bf16 params':>15}")
    for i, stage in enumerate(args.stages):
        before, after = (run_case(stage, s, args.accum, 29500 + 10 * i + s - args.steps)
                         for s in (args.steps, args.steps + 1))
        predicted = collections.Counter()
        features = feature_bytes(4 * args.accum, arch.embed_dim)
        for c in step_collectives(stage, counts.total, persistent, args.accum, args.accum > 1, features):
            if c.op != "reduce-scatter" or c.buffer_bytes != features:  # gloo: an all-to-all (comm.py)
                predicted[c.op] += c.count * c.buffer_bytes
        for op in sorted(set(after) | set(predicted)):
            measured = after.get(op, 0) - before.get(op, 0)
            print(f"{stage:>4}  {op:<15}{measured:>16,}{predicted[op]:>12,}{measured / (2 * counts.total):>15.2f}")
    return 0


if __name__ == "__main__":
    if "--in-rank" in sys.argv:
        sys.argv.remove("--in-rank")
        sys.exit(_count_and_run(sys.argv[1:]))
    sys.exit(main())
