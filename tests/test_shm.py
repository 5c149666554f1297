"""megapgs/shm.py: which /dev/shm files it proves dead, and DeepSpeed's comm backend without its shm op."""
import os
import subprocess
import sys
from pathlib import Path

from megapgs.shm import stale_files, sweep_stale_files

HOLD = ("import mmap, sys, time\n"
        "fh = open(sys.argv[1], 'r+b'); view = mmap.mmap(fh.fileno(), 0)\n"
        "print('mapped', flush=True); time.sleep(600)\n")


def test_files_no_process_maps_are_stale_and_swept_the_mapped_one_stays(tmp_path):
    uid = os.getuid()
    dead = [tmp_path / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29999_0", tmp_path / "sem.mp-abcd1234"]
    live = tmp_path / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29998_0"
    other = [tmp_path / f"deepspeed_allreduce_buffer_{uid + 1}_127.0.0.1_29999_0", tmp_path / "torch_1234_567"]
    for path in [*dead, live, *other]:
        path.write_bytes(b"\0" * 4096)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mapped"
        assert stale_files(tmp_path) == sorted(dead)
        assert sweep_stale_files(tmp_path) == sorted(dead)
        assert not any(p.exists() for p in dead) and live.exists() and all(p.exists() for p in other)
    finally:
        holder.kill()
        holder.wait()
    assert stale_files(tmp_path) == [live]  # its owner is gone now


def test_deepspeed_comm_backend_starts_without_the_shm_op():
    """One rank joins a process group under LOCAL_SIZE=1 (which would make DeepSpeed create its
    /dev/shm buffer): no op is built, no buffer appears."""
    script = ("import torch; from deepspeed.comm import comm; from megapgs.dist import DistInfo, join_process_group\n"
              "join_process_group(DistInfo(0, 1, 0, torch.device('cpu')))\n"
              "print('shm op:', comm.cdb.shm_comm_op)\n")
    before = set(os.listdir("/dev/shm"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "LOCAL_SIZE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shm op: None" in result.stdout and "deepspeed_shm_comm" not in result.stdout + result.stderr
    new = {name for name in set(os.listdir("/dev/shm")) - before if name.startswith("deepspeed_allreduce_buffer")}
    assert not new, new


SPAWN_LOCK = ("import multiprocessing, time\n"
              "lock = multiprocessing.get_context('spawn').Lock()\n"
              "print(lock._semlock.name, flush=True); time.sleep(600)\n")


def test_a_live_spawn_semaphore_is_not_stale():
    """glibc's sem_open maps a new semaphore under a temporary name before linking it to its own:
    the creator's maps name the temporary file, so a live one is recognised by its inode."""
    holder = subprocess.Popen([sys.executable, "-c", SPAWN_LOCK], stdout=subprocess.PIPE, text=True)
    try:
        name = holder.stdout.readline().strip()  # /mp-xxxxxxxx
        path = Path("/dev/shm") / f"sem{name.replace('/', '.')}"
        assert path.exists()
        assert path not in stale_files()
    finally:
        holder.kill()
        holder.wait()
