"""tools/gpu_check.sh: its CPU mode passes here with real figures, and it cannot pass what did not.

The CPU mode runs every piece of the GPU mode with the tiny config and the CPU twins, so the
script works the first time a GPU is there; the CUDA tests are collected and reported skipped.
"""
from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIECES = ["environment", "cuda_tests", "train_zero1", "resume_zero1", "train_zero3", "resume_zero3",
          "bench_loader", "bench_attention", "bench_pgs", "profile_pgs05", "profile_pgs03"]


def gpu_check(out_dir: Path, *options: str, extra: tuple[str, ...] = (), env: dict | None = None,
              timeout: int = 900) -> tuple[subprocess.CompletedProcess, dict | None]:
    cmd = ["bash", "tools/gpu_check.sh", *options, str(out_dir), *(("--", *extra) if extra else ())]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
                            env={**os.environ, "PYTHON": sys.executable, **(env or {})})
    report = out_dir / "report.json"
    return result, json.loads(report.read_text()) if report.is_file() else None


def by_name(report: dict) -> dict[str, dict]:
    return {check["name"]: check for check in report["checks"]}


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gpu_check")
    result, report = gpu_check(out_dir, "--cpu")
    return out_dir, result, report


def test_cpu_mode_passes_and_reports_every_check(cpu_check):
    out_dir, result, report = cpu_check
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert report["mode"] == "cpu" and report["status"] == "passed"
    assert [check["name"] for check in report["checks"]] == PIECES
    for check in report["checks"]:
        assert {"name", "status", "reason", "seconds", "figures"} <= set(check)
        assert check["status"] in ("passed", "skipped"), check
        assert check["status"] == "passed" or check["reason"], check  # a skip always says why
    assert report["counts"]["failed"] == 0
    markdown = (out_dir / "report.md").read_text()
    assert "| check | status | seconds | key figures | reason |" in markdown
    assert all(f"| {name} |" in markdown for name in PIECES)
    with tarfile.open(out_dir / "logs.tar.gz") as archive:
        names = archive.getnames()
    assert {"report.json", "report.md", "logs/train_zero1.log", "runs/resume_zero3/metrics.jsonl"} <= set(names)
    assert not any("checkpoints" in name for name in names)
    env = by_name(report)["environment"]["figures"]
    assert all(env["packages"][name] for name in ("torch", "deepspeed", "open_clip_torch", "webdataset", "pot",
                                                   "pydantic"))
    assert env["cuda_available"] is False


def test_cuda_tests_are_collected_and_reported_skipped_not_passed(cpu_check):
    _, _, report = cpu_check
    tests = by_name(report)["cuda_tests"]
    assert tests["status"] == "skipped" and "all skipped" in tests["reason"]
    figures = tests["figures"]
    assert figures["passed"] == 0 and figures["failed"] == 0 and figures["skipped"] == figures["collected"] >= 4
    names = {t["test"] for t in figures["tests"]}
    assert any(name.startswith("tests.cuda.test_fast_path::test_fast_attention_path") for name in names)
    assert any(name.startswith("tests.models.test_attention::test_gpu_backends_bf16") for name in names)
    assert any(name.startswith("tests.data.test_dali::") for name in names) or figures["not_collected"]
    for name in ("bench_attention", "bench_pgs", "profile_pgs05", "profile_pgs03"):
        assert by_name(report)[name]["status"] == "skipped" and "GPU mode only" in by_name(report)[name]["reason"]


@pytest.mark.parametrize("stage", [1, 3])
def test_both_training_runs_and_their_resume_pass_with_real_figures(cpu_check, stage):
    _, _, report = cpu_check
    train, resume = by_name(report)[f"train_zero{stage}"], by_name(report)[f"resume_zero{stage}"]
    assert train["status"] == resume["status"] == "passed"
    figures = train["figures"]
    assert figures["logged_steps"] == [10, 20, 30]
    assert all(math.isfinite(loss) for loss in figures["losses"].values())
    assert figures["losses"]["30"] < figures["losses"]["10"]  # it trains
    assert figures["samples_per_s"] > 0 and figures["step_ms"] > 0
    assert 0 < figures["keep_ratio"] < 0.8  # PGS masked every step
    assert figures["attention_backend"] == "sdpa_padded"  # auto on the CPU
    assert "x 2 accumulation" in figures["header"]["batch"]
    assert f"ZeRO-{stage}, bf16" in figures["header"]["engine"]
    assert figures["deepspeed"]["zero_optimization"]["stage"] == stage
    resumed = resume["figures"]
    assert resumed["logged_steps"] == [30] and resumed["compared_steps"] == [30]
    assert resumed["max_rel_diff"] <= 1e-5 == resumed["rtol"]


def test_the_loader_benchmark_runs_or_says_why_not(cpu_check):
    _, _, report = cpu_check
    bench = by_name(report)["bench_loader"]
    if bench["status"] == "skipped":
        assert "nvidia.dali" in bench["reason"]
    else:
        assert bench["status"] == "passed" and all(rate > 0 for rate in bench["figures"]["images_per_s"].values())


def test_without_dali_its_pieces_are_skipped_with_the_reason(tmp_path):
    """A machine without DALI (the lent GPU machine, unless DALI's wheels were brought): the loader
    benchmark is skipped and the DALI test file is not collected, both saying why."""
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[:2] == ['nvidia', 'dali']:\n"
        "            raise ImportError('no DALI here')\n"
        "sys.meta_path.insert(0, Block())\n")
    path = os.pathsep.join(filter(None, [str(tmp_path / "block"), os.environ.get("PYTHONPATH")]))
    result, report = gpu_check(tmp_path / "out", "--cpu", "--only", "cuda_tests,bench_loader", env={"PYTHONPATH": path})
    assert result.returncode == 0, result.stdout[-3000:]
    checks = by_name(report)
    assert checks["bench_loader"]["status"] == "skipped" and "no DALI here" in checks["bench_loader"]["reason"]
    assert checks["cuda_tests"]["status"] == "skipped"
    assert checks["cuda_tests"]["figures"]["not_collected"] == [
        "tests/data/test_dali.py (nvidia.dali does not import: ImportError: no DALI here)"]


def test_a_failing_piece_fails_the_check_and_the_rest_still_run(tmp_path):
    result, report = gpu_check(tmp_path, "--cpu", "--only", "train_zero1,resume_zero1,bench_loader",
                               extra=("--set", "model.arch=no-such-arch"))
    assert result.returncode == 1, result.stdout[-3000:]
    checks = by_name(report)
    assert report["status"] == "failed" and list(checks) == ["train_zero1", "resume_zero1", "bench_loader"]
    assert checks["train_zero1"]["status"] == "failed" and checks["train_zero1"]["exit_code"] == 2
    assert "no-such-arch" in (tmp_path / "report.md").read_text()  # the log's last lines are in the report
    assert checks["resume_zero1"]["status"] == "skipped" and "train_zero1" in checks["resume_zero1"]["reason"]
    assert checks["bench_loader"]["status"] in ("passed", "skipped")  # it ran after the failure


def test_a_timed_out_piece_is_failed(tmp_path):
    result, report = gpu_check(tmp_path, "--cpu", "--only", "environment", env={"GPU_CHECK_TIMEOUT_S": "1"})
    assert result.returncode == 1
    check = by_name(report)["environment"]
    assert check["status"] == "failed" and check["reason"] == "timed out after 1 s"


def test_gpu_mode_refuses_a_machine_without_cuda(tmp_path):
    result, report = gpu_check(tmp_path, "--only", "environment,train_zero1")
    assert result.returncode == 1
    checks = by_name(report)
    assert checks["environment"]["status"] == "failed" and "no CUDA device" in checks["environment"]["reason"]
    assert checks["train_zero1"]["status"] == "skipped"
    assert "environment check failed" in checks["train_zero1"]["reason"]


def test_gpu_mode_training_command_runs(tmp_path):
    """The GPU mode's own overrides of configs/vitb16_pgs03.json (synthetic data, no evaluation,
    steps instead of epochs, bf16, accumulation 2), on a tiny arch so that it runs here."""
    result, report = gpu_check(tmp_path, "--only", "train_zero1", extra=("--set", "model.arch=tiny-32"),
                               env={"OMP_WAIT_POLICY": "PASSIVE"})  # what --cpu sets: see gpu_check.sh
    assert result.returncode == 0, result.stdout[-4000:]
    figures = by_name(report)["train_zero1"]["figures"]
    assert figures["logged_steps"] == [10, 20, 30] and "64 = 32 per rank x 1 ranks x 2" in figures["header"]["batch"]


def test_bad_usage_exits_2(tmp_path):
    assert gpu_check(tmp_path, "--only", "no_such_piece")[0].returncode == 2
    no_out_dir = subprocess.run(["bash", "tools/gpu_check.sh", "--cpu"], cwd=ROOT, capture_output=True, check=False)
    assert no_out_dir.returncode == 2


def test_every_cuda_only_test_is_marked_cuda():
    """gpu_check.sh runs `pytest -m cuda`: a test skipped without CUDA but not marked would never run there."""
    unmarked = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marked = any(isinstance(node, ast.Assign) and "mark.cuda" in ast.unparse(node.value)
                            and any(getattr(target, "id", "") == "pytestmark" for target in node.targets)
                            for node in tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                decorators = [ast.unparse(d) for d in node.decorator_list]
                needs_cuda = any("skipif" in d and "cuda.is_available" in d for d in decorators)
                if needs_cuda and not module_marked and "pytest.mark.cuda" not in decorators:
                    unmarked.append(f"{path.relative_to(ROOT)}::{node.name}")
    assert not unmarked, f"add @pytest.mark.cuda to {unmarked}"
