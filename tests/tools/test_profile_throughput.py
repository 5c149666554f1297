"""tools/profile_throughput.py on the tiny config with the OpenCLIP baseline: every variant timed,
PGS's realised share used for the share-matched variants, ratios printed, a trace written."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^(?P<name>(megapgs|OpenCLIP) .+?)\s+(?P<rate>[\d.]+)\s+(?P<tokens>\d+)\s+(?P<kept>[\d.]+)\s")


def test_profiler_times_megapgs_beside_openclip(tmp_path):
    cmd = [sys.executable, "tools/profile_throughput.py", "--baseline", "openclip", "--compile", "eager",
           "--batch", "16", "--steps", "2", "--warmup", "1", "--trace", str(tmp_path / "trace")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {m["name"]: m for m in map(ROW.match, done.stdout.splitlines()) if m}
    share = float(rows["megapgs pgs"]["kept"])
    assert 0 < share < 0.7 + 1e-3  # PGS kept at most k_max, on photos far fewer
    names = set(rows)
    assert {"megapgs pgs", "megapgs unmasked", "OpenCLIP unmasked", "OpenCLIP FLIP-0.3"} <= names
    assert f"megapgs random @{share:.2f}" in names and f"OpenCLIP dropout @{share:.2f}" in names
    assert float(rows["megapgs unmasked"]["kept"]) == float(rows["OpenCLIP unmasked"]["kept"]) == 1.0
    assert abs(float(rows[f"OpenCLIP dropout @{share:.2f}"]["kept"]) - share) < 1 / 49 + 1e-3  # same token count
    assert all(float(m["rate"]) > 0 for m in rows.values())
    assert "ratios of samples/s (megapgs / OpenCLIP):" in done.stdout
    assert any((tmp_path / "trace").rglob("*.json")), "no torch.profiler trace written"


def test_sweep_plots_both_implementations_against_the_kept_share(tmp_path):
    out = tmp_path / "sweep.png"
    cmd = [sys.executable, "tools/plot_throughput.py", "--kept", "0.5", "1.0", "--batch", "16", "--steps", "1",
           "--warmup", "1", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split("|") for line in done.stdout.splitlines() if re.match(r"^\s+(0\.5|1) \|", line)]
    assert [float(r[0]) for r in rows] == [0.5, 1.0]
    for share, ours, theirs, ratio in rows:
        kept = [float(re.search(r"kept ([\d.]+)", cell)[1]) for cell in (ours, theirs)]
        assert kept[0] == kept[1] and abs(kept[0] - float(share)) < 1 / 49 + 1e-3  # the same token count
        assert float(ratio.strip().lstrip("x")) > 0
    assert re.search(r"^megapgs PGS-0.3: [\d.]+ samples/s at kept 0\.\d+$", done.stdout, re.M)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
