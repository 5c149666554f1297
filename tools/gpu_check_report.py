"""The Python half of tools/gpu_check.sh: the environment piece, and the report of all pieces.

    python tools/gpu_check_report.py env --mode gpu --out OUT/logs/environment.json
    python tools/gpu_check_report.py report OUT --mode gpu --steps 30 --resume-step 20 --rtol 1e-2

gpu_check.sh runs each piece under `timeout` and writes one line per piece to OUT/pieces.tsv
(name, passed|failed|skipped, exit code, seconds, limit, reason); `report` reads those lines and
each piece's own evidence (pytest's JUnit XML, the runs' metrics.jsonl, the tools' printed
figures), writes OUT/report.json and OUT/report.md, prints the summary table and exits 1 when any
check failed. It only ever downgrades a piece: a test piece whose tests were all skipped is
reported skipped, a run that logged no final loss or a resume whose losses differ is failed.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import platform
import re
import shutil
import sys
import sysconfig
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# (distribution, import name): what a run needs; DALI and the attention kernels are optional
# (the check itself needs pytest and scikit-image's photos; a run imports rich, safetensors, torchvision)
REQUIRED = [("torch", "torch"), ("deepspeed", "deepspeed"), ("open_clip_torch", "open_clip"),
            ("webdataset", "webdataset"), ("pot", "ot"), ("pydantic", "pydantic"), ("rich", "rich"),
            ("safetensors", "safetensors"), ("torchvision", "torchvision"), ("pytest", "pytest"),
            ("scikit-image", "skimage")]
OPTIONAL = [("nvidia-dali-cuda130", "nvidia.dali"), ("flash-attn", "flash_attn"), ("xformers", "xformers"),
            ("tensorboard", "tensorboard")]
TRAIN_FIGURES = ("loss", "samples_per_s", "step_ms", "keep_ratio", "mfu", "image_tokens_per_s", "pgs_ms",
                 "forward_ms", "loss_ms", "backward_ms", "optimizer_ms", "feature_cache_ms", "data_ms")


# ----------------------------------------------------------------------------- the environment piece

def package_version(dist: str, module: str) -> tuple[str | None, str | None]:
    """(version, None) when `module` imports, else (None, why not)."""
    try:
        imported = importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any import failure means "missing here"
        return None, f"{type(err).__name__}: {err}".splitlines()[0][:200]
    try:
        return importlib.metadata.version(dist), None
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(imported, "__version__", "unknown")), None


def environment(mode: str) -> tuple[dict, list[str]]:
    """(figures, problems): versions, the CUDA device, what auto attention resolves to."""
    figures: dict = {"python": platform.python_version(), "executable": sys.executable,
                     "platform": platform.platform()}
    problems, missing = [], {}
    packages = {}
    for dist, module in REQUIRED + OPTIONAL:
        version, why = package_version(dist, module)
        packages[dist] = version
        if version is None:
            missing[dist] = why
    figures["packages"], figures["missing"] = packages, missing
    # what torch.compile's first kernel build needs (a C compiler and Python's headers): without them
    # the compiled resume fails, and the report should say why at a glance
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    figures["c_compiler"] = shutil.which("cc") or shutil.which("gcc")
    figures["python_headers"] = headers.is_file()
    required_missing = [dist for dist, _ in REQUIRED if dist in missing]
    if required_missing:
        problems.append("missing: " + ", ".join(required_missing))
    if packages["torch"] is not None:
        import torch

        figures["torch_cuda"] = torch.version.cuda
        figures["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            figures.update(device=props.name, capability=f"{props.major}.{props.minor}",
                           device_memory_gib=round(props.total_memory / 2**30, 1),
                           multiprocessors=props.multi_processor_count, device_count=torch.cuda.device_count())
            sys.path.insert(0, str(REPO_ROOT))
            from megapgs.models.attention import resolve_backend

            figures["attention_auto_bf16"] = resolve_backend("auto", torch.device("cuda"), torch.bfloat16, True)
        elif mode == "gpu":
            problems.append("torch sees no CUDA device (run with --cpu on a machine without one)")
    return figures, problems


def cmd_env(args: argparse.Namespace) -> int:
    figures, problems = environment(args.mode)
    text = json.dumps({"figures": figures, "problems": problems}, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


# ----------------------------------------------------------------------------- reading the pieces

@dataclass
class Check:
    """One piece as gpu_check.sh recorded it, then judged on its evidence."""
    name: str
    status: str              # passed | failed | skipped
    rc: int | None           # the piece's exit code (None: not run)
    seconds: float
    limit: int | None        # its timeout, seconds
    reason: str
    log: Path
    figures: dict = field(default_factory=dict)

    def fail(self, reason: str) -> None:
        self.status, self.reason = "failed", reason

    def skip(self, reason: str) -> None:
        self.status, self.reason = "skipped", reason

    def command(self) -> str | None:
        if not self.log.is_file():
            return None
        first = self.log.read_text(errors="replace").split("\n", 1)[0]
        return first[2:] if first.startswith("$ ") else None

    def log_tail(self, lines: int = 15) -> str:
        if not self.log.is_file():
            return ""
        return "\n".join(self.log.read_text(errors="replace").rstrip().splitlines()[-lines:])

    def as_json(self, out_dir: Path) -> dict:
        log = str(self.log.relative_to(out_dir)) if self.log.is_file() else None
        return {"name": self.name, "status": self.status, "reason": self.reason, "seconds": round(self.seconds, 1),
                "limit_s": self.limit, "exit_code": self.rc, "command": self.command(), "log": log,
                "figures": self.figures}


def read_pieces(out_dir: Path) -> list[Check]:
    checks = []
    for line in (out_dir / "pieces.tsv").read_text().splitlines():
        name, status, rc, seconds, limit, reason = line.split("\t", 5)
        checks.append(Check(name, status, int(rc) if rc else None, float(seconds), int(limit) if limit else None,
                            reason, out_dir / "logs" / f"{name}.log"))
    return checks


def train_records(run_dir: Path) -> dict[int, dict]:
    """The last train record per step of a run's metrics.jsonl."""
    records = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "train":
                records[record["step"]] = record
    return records


def _search(pattern: str, text: str) -> str | None:
    found = re.search(pattern, text)
    return found.group(1).strip() if found else None


def run_header(log_text: str) -> dict[str, str]:
    """The rows of the "megapgs run" table a run prints first (model, masking, batch, contrastive, engine)."""
    rows: dict[str, str] = {}
    name = None
    for line in log_text.splitlines():
        cells = re.fullmatch(r"\s*│\s*(.*?)\s*│\s*(.*?)\s*│\s*", line)
        if not cells:
            if rows and line.strip().startswith("└"):
                break
            continue
        if cells.group(1):
            name = cells.group(1)
            rows[name] = cells.group(2)
        elif name:
            rows[name] += " " + cells.group(2)
    return rows


def judge_environment(check: Check) -> None:
    path = check.log.with_suffix(".json")
    if path.is_file():
        data = json.loads(path.read_text())
        check.figures = data["figures"]
        if check.status == "failed" and data["problems"] and "timed out" not in check.reason:
            check.reason = "; ".join(data["problems"])


def judge_tests(check: Check) -> None:
    """pytest's JUnit XML: counts and each test's outcome. All skipped is skipped, never passed."""
    xml = check.log.with_suffix(".xml")
    if not xml.is_file():
        if check.status == "passed":
            check.fail("pytest wrote no JUnit report")
        return
    tests = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                detail = (child.get("message") or "").splitlines()[0][:200] if child.get("message") else ""
                break
        tests.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "detail": detail, "seconds": round(float(case.get("time") or 0), 2)})
    counts = {kind: sum(t["outcome"] == kind for t in tests) for kind in ("passed", "failed", "error", "skipped")}
    log_text = check.log.read_text(errors="replace") if check.log.is_file() else ""
    not_collected = re.findall(r"^NOT COLLECTED: (.*)$", log_text, flags=re.MULTILINE)
    check.figures = {"collected": len(tests), **counts, "not_collected": not_collected, "tests": tests}
    if check.status != "passed":
        return
    if counts["failed"] or counts["error"]:
        check.fail(f"{counts['failed']} failed, {counts['error']} errors")
    elif counts["passed"] == 0:
        reasons = sorted({t["detail"] for t in tests if t["outcome"] == "skipped"})
        check.skip(f"{len(tests)} CUDA tests collected, all skipped ({'; '.join(reasons)[:200]})" + (
            f"; not collected: {'; '.join(not_collected)}" if not_collected else ""))
    elif counts["skipped"] or not_collected:
        check.reason = f"{counts['passed']} passed, {counts['skipped']} skipped" + (
            f"; not collected: {'; '.join(not_collected)}" if not_collected else "")


def judge_train(check: Check, run_dir: Path, steps: int) -> None:
    records = train_records(run_dir)
    log_text = check.log.read_text(errors="replace") if check.log.is_file() else ""
    last = records.get(steps, {})
    check.figures = {
        "logged_steps": sorted(records), "losses": {str(s): r["loss"] for s, r in sorted(records.items())},
        **{k: last[k] for k in TRAIN_FIGURES if k in last},
        **{k: v for k, v in last.items() if "mem" in k},
        "peak_memory": next((v for k, v in last.items() if "mem" in k), None),
        "attention_backend": _search(r"attention back-end: (\S+)", log_text),
        "header": run_header(log_text),
        "summary": _search(r"(megapgs: trained [^\n]*)", log_text),
    }
    config = run_dir / "config.json"
    if config.is_file():
        check.figures["deepspeed"] = json.loads(config.read_text()).get("deepspeed")
    if check.status != "passed":
        return
    if not last or not math.isfinite(last.get("loss", math.nan)):
        check.fail(f"no finite loss logged at step {steps} (logged steps: {sorted(records)})")


def judge_resume(check: Check, resumed_dir: Path, straight_dir: Path, steps: int, resume_step: int,
                 rtol: float) -> None:
    """The resumed run logs only steps after the checkpoint, and equals the straight run there."""
    judge_train(check, resumed_dir, steps)
    if check.status != "passed":
        return
    straight, resumed = train_records(straight_dir), train_records(resumed_dir)
    early = [s for s in resumed if s <= resume_step]
    if early:
        check.fail(f"the resumed run logged steps {early}: it did not start from the step-{resume_step} checkpoint")
        return
    compared = sorted(s for s in resumed if s in straight)
    diffs = {str(s): abs(resumed[s]["loss"] - straight[s]["loss"]) / max(abs(straight[s]["loss"]), 1e-12)
             for s in compared}
    masks = {str(s): resumed[s].get("mask_checksum") == straight[s].get("mask_checksum") for s in compared}
    check.figures.update(compared_steps=compared, straight_losses={str(s): straight[s]["loss"] for s in compared},
                         rel_diff=diffs, max_rel_diff=max(diffs.values(), default=None), rtol=rtol,
                         same_masks=masks)
    if steps not in compared:
        check.fail(f"step {steps} is not logged by both runs "
                   f"(straight: {sorted(straight)}, resumed: {sorted(resumed)})")
    elif max(diffs.values()) > rtol:
        worst = max(diffs, key=diffs.get)
        check.fail(f"resumed loss differs at step {worst}: {resumed[int(worst)]['loss']:.6g} vs "
                   f"{straight[int(worst)]['loss']:.6g} (rel {diffs[worst]:.2e} > {rtol:g})")
    else:
        check.reason = f"steps {compared} within rel {rtol:g} (max {max(diffs.values()):.1e})"


def judge_printout(check: Check) -> None:
    """A benchmark: the lines it printed (not the warnings), and images/s per worker count."""
    if not check.log.is_file():
        return
    lines = [line for line in check.log.read_text(errors="replace").splitlines()[1:]
             if line.strip() and not re.search(r"warn|Warning|^\s*(warnings\.warn|\[|W\d{4})", line)]
    check.figures["output"] = lines[-40:]
    rates = {m.group(1): float(m.group(2)) for line in lines
             if (m := re.match(r"workers=(\d+):\s+([\d.]+) images/s", line))}
    if rates:
        check.figures["images_per_s"] = rates


def judge(checks: list[Check], out_dir: Path, steps: int, resume_step: int, rtol: float) -> None:
    runs = out_dir / "runs"
    for check in checks:
        if check.status == "skipped":
            continue
        if check.name == "environment":
            judge_environment(check)
        elif check.name == "cuda_tests":
            judge_tests(check)
        elif check.name.startswith("train_"):
            judge_train(check, runs / check.name, steps)
        elif check.name.startswith("resume_"):
            straight = "train_" + check.name.removeprefix("resume_")
            judge_resume(check, runs / check.name, runs / straight, steps, resume_step, rtol)
        else:
            judge_printout(check)
        if check.status == "failed" and not check.reason:
            check.reason = f"exit code {check.rc}"


# ----------------------------------------------------------------------------- writing the report

def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def key_figures(check: Check) -> str:
    f = check.figures
    if check.name == "environment":
        parts = [f"python {f.get('python')}", f"torch {f.get('packages', {}).get('torch')}",
                 f.get("device") or "no CUDA device"]
        if f.get("attention_auto_bf16"):
            parts.append(f"auto attention: {f['attention_auto_bf16']}")
        if f.get("missing"):
            parts.append("missing: " + ", ".join(f["missing"]))
        return "; ".join(parts)
    if check.name == "cuda_tests":
        return ", ".join(f"{f[k]} {k}" for k in ("collected", "passed", "failed", "error", "skipped") if k in f)
    if check.name.startswith(("train_", "resume_")):
        keys = ("loss", "samples_per_s", "step_ms", "keep_ratio", "mfu", "peak_memory")
        parts = [f"{k} {_fmt(f[k])}" for k in keys if f.get(k) is not None]
        if f.get("max_rel_diff") is not None:
            parts.append(f"max rel diff {f['max_rel_diff']:.1e} (tol {f['rtol']:g})")
        if f.get("attention_backend"):
            parts.append(f"attention {f['attention_backend']}")
        return ", ".join(parts)
    if f.get("images_per_s"):
        return ", ".join(f"{w} workers: {r:.0f} img/s" for w, r in f["images_per_s"].items())
    return f"{len(f.get('output', []))} lines printed" if f.get("output") else ""


def markdown(report: dict, checks: list[Check]) -> str:
    out = [f"# GPU check ({report['mode']} mode): {report['status'].upper()}", "",
           (f"{report['started']}, {report['seconds']:.0f} s in all; {report['host']}; "
            f"{report['counts']['passed']} passed, {report['counts']['failed']} failed, "
            f"{report['counts']['skipped']} skipped."), "",
           "| check | status | seconds | key figures | reason |", "|---|---|---|---|---|"]
    for check in checks:
        reason = check.reason.replace("|", "/").replace("\n", " ")
        out.append(f"| {check.name} | {check.status} | {check.seconds:.1f} | {key_figures(check)} | {reason} |")
    for check in checks:
        out += ["", f"## {check.name}: {check.status}", ""]
        if check.command():
            out += [f"`{check.command()}`", ""]
        f = check.figures
        if check.name == "environment" and f:
            out += [f"- {k}: {_fmt(v)}" for k, v in f.items() if k not in ("packages", "missing")]
            out += [f"- {dist}: {version or 'MISSING (' + f['missing'].get(dist, '') + ')'}"
                    for dist, version in f.get("packages", {}).items()]
        elif check.name == "cuda_tests" and f.get("tests"):
            out += ["| test | outcome | seconds | detail |", "|---|---|---|---|"]
            out += [f"| {t['test']} | {t['outcome']} | {t['seconds']} | {t['detail'].replace('|', '/')} |"
                    for t in f["tests"]]
            out += [f"- not collected: {item}" for item in f.get("not_collected", [])]
        elif check.name.startswith(("train_", "resume_")) and f:
            if f.get("losses"):
                out += ["| step | loss |" + (" straight run | rel diff |" if f.get("rel_diff") else ""),
                        "|---|---|" + ("---|---|" if f.get("rel_diff") else "")]
                for step, loss in f["losses"].items():
                    row = f"| {step} | {loss:.6g} |"
                    if f.get("rel_diff") and step in f["rel_diff"]:
                        row += f" {f['straight_losses'][step]:.6g} | {f['rel_diff'][step]:.2e} |"
                    out.append(row)
                out.append("")
            out += [f"- {k}: {_fmt(f[k])}" for k in (*TRAIN_FIGURES[1:], "peak_memory", "attention_backend")
                    if f.get(k) is not None]
            out += [f"- {row}: {value}" for row, value in f.get("header", {}).items()]
            out += [f"- DeepSpeed section: `{json.dumps(f['deepspeed'])}`" if f.get("deepspeed") else "",
                    f"- {f['summary']}" if f.get("summary") else ""]
        elif f.get("output"):
            out += ["```", *f["output"], "```"]
        if check.status == "failed" and check.log_tail():
            out += ["", "Last lines of the log:", "", "```", check.log_tail(), "```"]
    return "\n".join(out) + "\n"


def cmd_report(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir).resolve()
    checks = read_pieces(out_dir)
    judge(checks, out_dir, args.steps, args.resume_step, args.rtol)
    counts = {status: sum(c.status == status for c in checks) for status in ("passed", "failed", "skipped")}
    env = next((c.figures for c in checks if c.name == "environment"), {})
    report = {
        "mode": args.mode, "status": "failed" if counts["failed"] else "passed",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(args.started)) if args.started else None,
        "seconds": time.time() - args.started if args.started else sum(c.seconds for c in checks),
        "host": env.get("device") or platform.node() or "unknown host", "counts": counts,
        "checks": [c.as_json(out_dir) for c in checks],
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report, checks)
    (out_dir / "report.md").write_text(text)
    print(text.split("\n## ", 1)[0].rstrip())  # the table; the details are in report.md
    print(f"\nreport: {out_dir / 'report.md'}, {out_dir / 'report.json'}")
    return 1 if counts["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="print versions and the device; exit 1 if a required piece is missing")
    env.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    env.add_argument("--out", help="also write the JSON here")
    rep = sub.add_parser("report", help="write OUT/report.json and OUT/report.md from OUT/pieces.tsv")
    rep.add_argument("out_dir")
    rep.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    rep.add_argument("--steps", type=int, required=True, help="the runs' last step")
    rep.add_argument("--resume-step", type=int, required=True, help="the checkpoint the resumed runs start from")
    rep.add_argument("--rtol", type=float, required=True, help="resumed vs straight loss, relative")
    rep.add_argument("--started", type=float, help="epoch seconds when the check began")
    args = parser.parse_args(argv)
    return cmd_env(args) if args.command == "env" else cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
