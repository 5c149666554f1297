"""Peak memory of real training ranks beside the dry run's estimate (megapgs/perf/memory.py).

    python tools/measure_memory.py                          # the 8 CPU cases, estimate vs measured
    python tools/measure_memory.py --cases tiny-z0-1 vitb16-z3-2 --steps 4
    python tools/measure_memory.py --baseline               # the CPU baseline constant's measurement
    python tools/measure_memory.py --from-json runs/memory.json   # the comparison again, no new runs

Each case runs `launch/pretrain.py` for a few steps on synthetic data (one process, or torchrun with
two ranks on master ports 29700-29720), evaluation off, the final checkpoint written as in any run.
Every rank records its own peak resident set size when it exits (VmHWM of /proc/self/status, the
kernel's high-water mark of the process's RSS, beside getrusage's ru_maxrss), so nothing is sampled
and no short peak is missed. The estimate is the dry run's, for the same config, ranks and device
(cpu); the ratio is estimate / measured of the rank with the highest peak.

Cases: tiny-28 (configs/tiny_cpu.json: micro batch 128, unmasked tail on) and ViT-B-16
(configs/vitb16_pgs03.json: fp32, micro batch 8, activation checkpointing as configured), each under
ZeRO-0 and ZeRO-3 (DeepSpeed's defaults otherwise), on 1 and 2 ranks, the micro batch per rank the
same on 1 and 2 ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT_ENV = "MEGAPGS_MEASURE_OUT"
PORTS = range(29700, 29721)
FP32 = '{"zero_optimization": {"stage": %d}, "gradient_clipping": 1.0}'


@dataclass(frozen=True)
class Case:
    name: str
    config: str
    micro_batch: int
    zero: int
    ranks: int
    extra: tuple[str, ...] = ()     # more overrides (key=value)

    def overrides(self, steps: int, output_dir: str) -> list[str]:
        sets = [f"data.source=synthetic", f"train.steps={steps}", "train.epochs=null",
                f"train.micro_batch_size={self.micro_batch}",
                f"train.global_batch_size={self.micro_batch * self.ranks}", f"deepspeed={FP32 % self.zero}",
                "eval.zeroshot=false", "eval.retrieval=false", "eval.every_steps=0", "train.checkpoint_every=0",
                "train.resume=none", f"train.output_dir={output_dir}", "log.tensorboard=false",
                "log.progress=false", *self.extra]
        return [arg for value in sets for arg in ("--set", value)]


# The baseline runs: the smallest model at micro batch 1 for one step, under ZeRO-0 and ZeRO-3
BASELINE_CASES = [Case(f"baseline-z{zero}", "configs/tiny_cpu.json", 1, zero, 1, ("model.arch=tiny-32",))
                  for zero in (0, 3)]
CASES = [Case(f"{arch}-z{zero}-{ranks}", config, batch, zero, ranks)
         for arch, config, batch in (("tiny", "configs/tiny_cpu.json", 128), ("vitb16", "configs/vitb16_pgs03.json", 8))
         for zero in (0, 3) for ranks in (1, 2)]
# Partitioned construction (issue 15, item 6): ViT-L/14 on 2 ranks under ZeRO-3, built under
# deepspeed.zero.Init or whole; not among the default cases (about 10 GiB per rank, minutes a case).
# DeepSpeed's default reduce bucket (5e8 elements, 1.9 GiB in fp32, larger than ViT-L) is cut to 5e7
# so that two ranks fit in a 24 GB machine.
ZERO_INIT_CASES = [Case(f"vitl-z3-2-{name}", "configs/vitl_pgs03.json", 1, 3, 2,
                        (f"model.partitioned_init={flag}", "deepspeed.zero_optimization.reduce_bucket_size=50000000"))
                   for name, flag in (("whole", "false"), ("partitioned", "true"))]
ALL_CASES = CASES + ZERO_INIT_CASES


# ----------------------------------------------------------------------------- inside a rank

def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rank_main(argv: list[str]) -> int:
    """Run one training rank (megapgs.entry.main) and write its peak RSS to $MEGAPGS_MEASURE_OUT."""
    from megapgs.entry import main

    marks: dict[str, int] = {}
    if "--mark-model-build" in argv:  # the baseline: RSS when the model is about to be built
        argv = [a for a in argv if a != "--mark-model-build"]
        import megapgs.train.engine as engine

        build = engine.build_model

        def marked(*args, **kwargs):
            marks["rss_before_model"] = _status_bytes("VmRSS")
            return build(*args, **kwargs)

        engine.build_model = marked
    code = main(argv)
    record = {"rank": int(os.environ.get("RANK", "0")), "exit_code": code, "vmhwm": _status_bytes("VmHWM"),
              "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **marks}
    out = Path(os.environ[OUT_ENV])
    (out / f"rank{record['rank']}.json").write_text(json.dumps(record))
    return code


# ----------------------------------------------------------------------------- the driver

def run_case(case: Case, steps: int, port: int, extra: list[str] | None = None) -> list[dict]:
    """Run a case; the per-rank records."""
    with tempfile.TemporaryDirectory(prefix=f"measure-{case.name}-") as tmp:
        out = Path(tmp) / "rss"
        out.mkdir()
        entry = [str(Path(__file__).resolve()), "--rank-main", "--config", case.config,
                 *case.overrides(steps, str(Path(tmp) / "run")), *(extra or [])]
        if case.ranks == 1:
            cmd = [sys.executable, *entry]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(case.ranks),
                   "--master_port", str(port), *entry]
        env = {**os.environ, OUT_ENV: str(out), "PYTHONUNBUFFERED": "1"}
        started = time.perf_counter()
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
            raise SystemExit(f"{case.name}: the run failed (exit code {result.returncode})")
        records = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
        if len(records) != case.ranks:
            raise SystemExit(f"{case.name}: {len(records)} of {case.ranks} ranks reported their peak")
        for record in records:
            record["seconds"] = round(time.perf_counter() - started, 1)
        return records


def estimate_case(case: Case, steps: int):
    from megapgs.config import load_config
    from megapgs.perf.dry_run import estimate_for

    cfg = load_config(ROOT / case.config, case.overrides(steps, "/tmp/unused")[1::2])
    return estimate_for(cfg, world_size=case.ranks, device="cpu")


def print_baseline(port: int) -> int:
    """Measure the CPU runtime constants of megapgs/perf/memory.py: each baseline run's peak RSS less
    the estimate of everything in it but the runtime (its model, activations, buffers)."""
    runtime = {}
    for case in BASELINE_CASES:
        record = run_case(case, 1, port, ["--mark-model-build"])[0]
        estimate = estimate_case(case, 1)
        above = estimate.peak_bytes - estimate.terms["runtime"].bytes
        runtime[case.zero] = record["vmhwm"] - above
        print(f"{case.name}: tiny-32, micro batch 1, 1 step, 1 rank: RSS when the model is built "
              f"{mib(record['rss_before_model'])}, peak {mib(record['vmhwm'])} (ru_maxrss {mib(record['ru_maxrss'])}); "
              f"estimated above the runtime {mib(above)}; runtime {runtime[case.zero]:,} bytes")
    print(f"CPU_BASELINE_BYTES = {runtime[0]:_}")
    print(f"CPU_ZERO3_RUNTIME_BYTES = {runtime[3] - runtime[0]:_}")
    return 0


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def compare(results: dict[str, list[dict]], steps: int) -> list[dict]:
    rows = []
    for case in ALL_CASES:
        if case.name not in results:
            continue
        estimate = estimate_case(case, steps)
        peaks = [r["vmhwm"] for r in results[case.name]]
        measured = max(peaks)
        rows.append({"case": case.name, "config": case.config, "zero": case.zero, "ranks": case.ranks,
                     "micro_batch": case.micro_batch, "estimate": estimate.peak_bytes, "measured": measured,
                     "ratio": estimate.peak_bytes / measured, "per_rank": peaks,
                     "dominant_phase": estimate.peak_phase})
    return rows


def print_table(rows: list[dict]) -> None:
    print("| case | config | ZeRO | ranks | micro batch | estimate | measured (peak RSS, max over ranks) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        per_rank = " / ".join(mib(p) for p in row["per_rank"])
        print(f"| {row['case']} | {row['config']} | {row['zero']} | {row['ranks']} | {row['micro_batch']} | "
              f"{mib(row['estimate'])} | {mib(row['measured'])} ({per_rank}) | {row['ratio']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank-main"]:
        return rank_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=[c.name for c in CASES],
                        choices=[c.name for c in ALL_CASES])
    parser.add_argument("--steps", type=int, default=4, help="training steps per case")
    parser.add_argument("--port", type=int, default=29700, help="first torchrun master port (29700-29720)")
    parser.add_argument("--json", type=Path, help="write the measurements and the comparison here")
    parser.add_argument("--from-json", type=Path, help="compare against measurements written before (no runs)")
    parser.add_argument("--baseline", action="store_true", help="measure the CPU baseline constant instead")
    args = parser.parse_args(argv)
    if args.baseline:
        return print_baseline(args.port)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        results, steps = saved["measured"], saved["steps"]
    else:
        results, steps = {}, args.steps
        ports = iter(p for p in PORTS if p >= args.port)
        for case in ALL_CASES:
            if case.name in args.cases:
                results[case.name] = run_case(case, steps, next(ports))
                print(f"{case.name}: peak RSS per rank {[mib(r['vmhwm']) for r in results[case.name]]} "
                      f"({results[case.name][0]['seconds']} s)", flush=True)
        if args.json:  # the measurements first: they outlast any change to the estimate
            args.json.write_text(json.dumps({"steps": steps, "measured": results}, indent=1))
    rows = compare(results, steps)
    print_table(rows)
    if args.json and not args.from_json:
        args.json.write_text(json.dumps({"steps": steps, "measured": results, "comparison": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
