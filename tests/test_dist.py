"""Collectives that are right on every backend: NCCL takes only CUDA tensors, a CPU test does not
see it, so the structure has to guarantee it. Every collective megapgs issues goes through
megapgs/dist.py, which puts its tensors on the communication device; the GPU process group also
has a CPU backend, so a library's CPU collective cannot kill a run."""
import ast
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megapgs import dist as megapgs_dist
from megapgs.config import REPO_ROOT
from megapgs.data.faults import SkipCounter
from megapgs.dist import DistInfo, all_gather_rows, all_reduce_sum, process_group_backend

COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "reduce", "gather", "gather_object",
    "scatter", "scatter_object_list", "barrier", "monitored_barrier", "all_to_all", "all_to_all_single",
    "send", "recv", "isend", "irecv", "batch_isend_irecv", "inference_all_reduce",
}
COMM_MODULES = ("torch.distributed", "deepspeed.comm")
ALLOWED = {"megapgs/dist.py"}


def _is_comm(path: str) -> bool:
    return any(path == m or path.startswith(m + ".") for m in COMM_MODULES)


def direct_collectives(source: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every call of a torch.distributed / deepspeed.comm collective."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> dotted module or function path
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b as c` binds c to a.b; `import a.b` binds a
                top = alias.name.split(".")[0]
                aliases[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        parts, func = [], node.func
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if not isinstance(func, ast.Name):
            continue
        dotted = ".".join([aliases.get(func.id, func.id), *reversed(parts)])
        module, _, name = dotted.rpartition(".")
        if name in COLLECTIVES and _is_comm(module):
            found.append((node.lineno, dotted))
    return found


def test_the_scanner_sees_every_spelling():
    source = textwrap.dedent("""
        import torch
        import torch.distributed as tdist
        import torch.distributed.nn.functional as dist_nn
        from torch.distributed import all_gather
        import deepspeed.comm as ds_dist
        torch.distributed.all_reduce(x)
        tdist.broadcast(x, 0)
        dist_nn.all_gather(x)
        all_gather(parts, x)
        ds_dist.barrier()
        torch.distributed.get_rank()
        x.all_reduce()
    """)
    assert [name for _, name in direct_collectives(source)] == [
        "torch.distributed.all_reduce", "torch.distributed.broadcast", "torch.distributed.nn.functional.all_gather",
        "torch.distributed.all_gather", "deepspeed.comm.barrier"]


def test_no_module_calls_a_collective_outside_dist_py():
    """megapgs/, tools/ and launch/: a direct torch.distributed collective anywhere but dist.py fails."""
    offenders = []
    for folder in ("megapgs", "tools", "launch"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            relative = path.relative_to(REPO_ROOT).as_posix()
            if relative in ALLOWED:
                continue
            offenders += [f"{relative}:{line}: {name}" for line, name in direct_collectives(path.read_text())]
    assert not offenders, "collectives outside megapgs/dist.py (use its functions):\n" + "\n".join(offenders)


def test_collectives_put_their_tensors_on_the_communication_device(monkeypatch):
    """A CPU tensor (a skip count, a host metric) reaches the collective on the rank's comm device."""
    seen = []
    monkeypatch.setattr(megapgs_dist.tdist, "all_reduce", lambda t, *a, **k: seen.append(t.device))
    monkeypatch.setattr(megapgs_dist.tdist, "all_gather", lambda parts, t, *a, **k: seen.append(t.device))
    elsewhere = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("meta"))
    assert all_reduce_sum(torch.ones(3), elsewhere).device == torch.device("meta")
    with pytest.raises(ValueError, match="takes tensors on meta"):
        all_gather_rows(torch.ones(2, 3), elsewhere, with_grad=False)
    all_gather_rows(torch.ones(2, 3, device="meta"), elsewhere, with_grad=False)
    assert seen == [torch.device("meta")] * 2


def test_skip_counts_are_reduced_through_dist_py(monkeypatch):
    calls = []

    def fake_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.device)
        tensor.mul_(2)  # as if a second rank had the same counts

    monkeypatch.setattr(megapgs_dist.tdist, "all_reduce", fake_all_reduce)
    skips = SkipCounter({"image_truncated": 3})
    two_ranks = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    assert skips.all_reduced(two_ranks).nonzero() == {"image_truncated": 6}
    assert calls == [torch.device("cpu")]
    assert skips.all_reduced().nonzero() == {"image_truncated": 3}  # alone: a copy, no collective


def test_the_gpu_process_group_has_a_cpu_backend():
    assert process_group_backend(torch.device("cuda", 3)) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(torch.device("cpu")) == "cpu:gloo"


GROUP_SCRIPT = """
import os, sys, torch, torch.distributed as tdist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1")
tdist.init_process_group(backend=sys.argv[1])
try:
    tdist.all_reduce(torch.ones(2))
    print("ok")
except RuntimeError as err:
    print("refused:", err)
tdist.destroy_process_group()
"""


@pytest.mark.parametrize("backend, expected", [
    ("cuda:gloo", "refused: No backend type associated with device type cpu"),  # NCCL's device map
    ("cpu:gloo,cuda:gloo", "ok"),  # ours, with gloo standing in for NCCL (no GPU here)
])
def test_a_cpu_collective_needs_a_cpu_backend(backend, expected):
    """What kills a GPU run at its first log step when the group is NCCL alone, reproduced on the CPU."""
    port = str(megapgs_dist._free_port())
    done = subprocess.run([sys.executable, "-c", GROUP_SCRIPT, backend, port], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.stdout.strip().splitlines()[-1] == expected, done.stderr[-2000:]


def test_allowed_files_exist():
    for relative in ALLOWED:
        assert (REPO_ROOT / relative).is_file()
    assert Path(megapgs_dist.__file__).resolve() == REPO_ROOT / "megapgs/dist.py"


def test_a_one_rank_group_takes_a_free_port_and_leaves_the_environment_alone():
    """A plain `python` run (or a tool a test starts) that inherits MASTER_PORT from a process that
    holds it still starts, and does not pass its own port on to its children."""
    script = ("import os, torch; from megapgs.dist import DistInfo, join_process_group; "
              "join_process_group(DistInfo(0, 1, 0, torch.device('cpu'))); "
              "print(torch.distributed.get_world_size(), os.environ.get('MASTER_PORT'))")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MASTER_PORT": port}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["1", port]
