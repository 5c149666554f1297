"""Running the entry points from the e2e tests."""
import subprocess

from megapgs.config import REPO_ROOT


def run(cmd, ok=True, timeout=600) -> subprocess.CompletedProcess:
    """`cmd` in the repository root; with `ok`, fails the test (with the output's tail) unless it exits 0."""
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    if ok:
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def words(result: subprocess.CompletedProcess) -> str:
    """stdout and stderr with rich's line wrapping undone."""
    return " ".join((result.stdout + result.stderr).split())
