"""Who this process is, the process group, and every collective megapgs issues.

`deepspeed`, `torchrun` and Slurm (through our launch script) all export RANK, LOCAL_RANK and
WORLD_SIZE; a plain `python pretrain.py` has none of them and is rank 0 of 1 (DeepSpeed still
needs a process group: it gets a one-rank group on a free local port).

The rule that a CPU test cannot see: NCCL takes only CUDA tensors ("No backend type associated
with device type cpu"). So on a GPU the process group is `cpu:gloo,cuda:nccl`: a library's
collective on a CPU tensor still works, over gloo; and megapgs's own collectives all go through
the functions below, which put their tensors on the communication device (the rank's GPU, or
the CPU) before the collective. tests/test_dist.py fails when a module calls torch.distributed's
collectives anywhere else.
"""
from __future__ import annotations

import atexit
import os
import socket
from dataclasses import dataclass
from typing import Iterable, Iterator, TypeVar

import torch
import torch.distributed as tdist
import torch.distributed.nn.functional as tdist_nn

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where this rank's collectives put their tensors: its GPU (NCCL), else the CPU (gloo)."""
        return self.device

    def barrier(self) -> None:
        if self.world_size > 1:
            if self.device.type == "cuda":  # NCCL's barrier on this rank's own GPU, not device 0
                tdist.barrier(device_ids=[self.device.index])
            else:
                tdist.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def process_group_backend(device: torch.device) -> str:
    """NCCL for CUDA tensors and gloo for CPU ones on a GPU; gloo alone on the CPU, named the same way
    ("cpu:gloo", a device-to-backend map like the GPU's) so that torch takes the same code paths on
    both: `get_backend()` is then not the plain "gloo" on either (e.g. torch.distributed.nn's
    all_gather backward branches on it), and the CPU tests run the GPU's branch."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "cpu:gloo"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_process_group(dist: DistInfo) -> None:
    """Create the process group (once) and let DeepSpeed's comm layer adopt it, without DeepSpeed's
    shared-memory op (megapgs/shm.py); the node's first rank first removes /dev/shm files of dead runs."""
    import deepspeed  # slow to import; only the engine and multi-rank start-up need it

    from megapgs.shm import disable_deepspeed_shm_op, sweep_stale_files

    disable_deepspeed_shm_op()
    if dist.is_local_main:
        sweep_stale_files()
    atexit.unregister(leave_process_group)  # once, however often a process joins
    atexit.register(leave_process_group)
    if tdist.is_initialized():
        deepspeed.init_distributed(verbose=False)  # adopts the group that is already there
        return
    rendezvous: dict[str, str] = {}
    if dist.world_size == 1 and "TORCHELASTIC_USE_AGENT_STORE" not in os.environ:
        # a one-rank group of its own, on a port nobody else holds (not one inherited from a parent
        # process, which may hold it); torchrun's agent hosts the store itself and keeps its port
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)  # DeepSpeed reads LOCAL_RANK later
        rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    before = {name: os.environ.get(name) for name in rendezvous}
    os.environ.update(rendezvous)
    try:
        # DeepSpeed hands the backend string to torch.distributed.init_process_group unchanged
        deepspeed.init_distributed(dist_backend=process_group_backend(dist.device), verbose=False)
    finally:  # child processes (a tool, a test's run) must not inherit the port this process holds
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def leave_process_group() -> None:
    """Destroy every process group. `join_process_group` registers it to run at the interpreter's exit
    (atexit runs before finalization begins): a gloo group left to the interpreter's teardown aborts
    the process now and then ("terminate called without an active exception", SIGABRT, after the
    run's work is done: a gloo worker thread frees a finished collective's tensors once Python is
    finalizing, and the GIL it asks for answers with pthread_exit). Two-rank exits of a bare gloo
    script with torch 2.14: 18 and 7 of 40 aborted, 0 of 40 with this call (BENCHMARKS.md). Not
    called when a run ends (main returning): a process may run again in the same interpreter (tests
    do), and DeepSpeed keeps the groups it made."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def init_distributed() -> DistInfo:
    """Read the launcher's environment and, with more than one rank, join the process group."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    info = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    if world_size > 1:
        join_process_group(info)
    return info


# ----------------------------------------------------------------------------- collectives

def all_reduce_sum(tensor: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """The sum over ranks of `tensor`, on the communication device (a copy when it was elsewhere)."""
    values = tensor.to(dist.comm_device, non_blocking=True)
    if dist.world_size > 1:
        if values is tensor:
            values = values.clone()
        tdist.all_reduce(values)
    return values


def all_gather_rows(rows_BE: torch.Tensor, dist: DistInfo, with_grad: bool) -> torch.Tensor:
    """(W*B, E): every rank's rows in rank order. With `with_grad` the gradient flows back to each
    rank's own rows from every rank (autograd through the gather); without it the other ranks'
    rows are constants and this rank's slice keeps its gradient."""
    if dist.world_size == 1:
        return rows_BE
    if rows_BE.device != dist.comm_device:
        raise ValueError(f"all_gather_rows takes tensors on {dist.comm_device}, got {rows_BE.device}")
    if with_grad:
        return torch.cat(tdist_nn.all_gather(rows_BE), dim=0)
    parts = [torch.empty_like(rows_BE) for _ in range(dist.world_size)]
    tdist.all_gather(parts, rows_BE.detach().contiguous())
    parts[dist.rank] = rows_BE  # this rank's slice, with its gradient
    return torch.cat(parts, dim=0)


def all_gather_varlen(rows: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Every rank's rows (any number each, the same trailing shape and dtype), concatenated in rank
    order, on the communication device. Reads the counts back to the host: not for a training step."""
    rows = rows.to(dist.comm_device)
    if dist.world_size == 1:
        return rows
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=dist.comm_device)
    counts = [torch.empty_like(count) for _ in range(dist.world_size)]
    tdist.all_gather(counts, count)
    sizes = [int(c) for c in torch.cat(counts).cpu()]
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(dist.world_size)]
    tdist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def mean_over_ranks(value: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """The mean over ranks of a 0-d value; its gradient is that of the local term."""
    if dist.world_size == 1:
        return value
    total = all_reduce_sum(value.detach(), dist)
    return value + (total / dist.world_size - value).detach()


def any_rank(flag: bool, dist: DistInfo) -> bool:
    """Whether `flag` is set on any rank: a CPU collective (gloo, also in a GPU's `cpu:gloo,cuda:nccl`
    group), so it never waits on a GPU's queue. Every rank must call it at the same point."""
    if dist.world_size == 1:
        return flag
    votes = torch.tensor([int(flag)], dtype=torch.int32)
    if "gloo" not in str(tdist.get_backend()):  # a group made elsewhere without a CPU backend: the GPU's
        votes = votes.to(dist.comm_device)      # (and reading the vote back waits for the GPU)
    tdist.all_reduce(votes)  # a CPU tensor goes to the group's gloo backend
    return bool(votes.cpu()[0])


def in_lockstep(items: Iterable[T], dist: DistInfo) -> Iterator[T | None]:
    """Each item, then None until every rank's items have ended: all ranks go round the same number
    of times (one CPU vote a round when there are several)."""
    items = iter(items)
    end = object()
    while True:
        item = next(items, end)
        more = item is not end
        if dist.world_size > 1:
            more = any_rank(more, dist)
        if not more:
            return
        yield None if item is end else item
