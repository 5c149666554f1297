"""Bytes a GPU sends per optimizer step under DeepSpeed's ZeRO stages, and their time on a link.

What DeepSpeed 0.19 issues for a megapgs run in bf16 with fp32 gradient accumulation (communication
in bf16, DeepSpeed's default `communication_data_type` for bf16), counted per optimizer step of
`accum` micro-batches on N ranks:

    ZeRO-1   bf16 + fp32 accumulation + stage 1 runs DeepSpeed's BF16_Optimizer: gradients accumulate
             locally; at the accumulation boundary one all-reduce of every gradient (bf16), after the
             step one all-gather of the updated bf16 parameters. Once per step, whatever `accum`.
    ZeRO-3   every pass of a micro-batch through the towers all-gathers the parameters that are not
             persistent (forward, backward, and the feature cache's no-grad forward when the loss sees
             the global batch through accumulation), every micro-batch reduce-scatters all gradients,
             and once a step the persistent parameters (stage3_param_persistence_threshold) are gathered.
    any      the contrastive loss gathers the image and text features of the global batch (bf16) once a
             step, and with `gather_with_grad` its backward reduce-scatters their gradients (NCCL; gloo
             emulates it with an all-to-all, which the CPU count does not see).

A ring collective sends (N - 1)/N of the buffer from each GPU for an all-gather or a reduce-scatter,
2 (N - 1)/N for an all-reduce. Counted on a 2-rank CPU run by tools/count_collectives.py
(BENCHMARKS.md): the bytes per step match these counts.
"""
from __future__ import annotations

from dataclasses import dataclass

BF16 = 2


@dataclass(frozen=True)
class Collective:
    op: str             # "all-reduce", "all-gather" or "reduce-scatter"
    buffer_bytes: int   # the whole buffer (the gathered output, the reduced input)
    count: int          # times per optimizer step

    def sent_per_gpu(self, world_size: int) -> float:
        """Bytes each GPU sends for these collectives in a ring over `world_size` ranks."""
        share = (world_size - 1) / world_size
        return self.count * self.buffer_bytes * share * (2 if self.op == "all-reduce" else 1)


def feature_bytes(global_batch: int, embed_dim: int, dtype_bytes: int = BF16) -> int:
    """The image and text features of the global batch, which the contrastive loss gathers."""
    return 2 * global_batch * embed_dim * dtype_bytes


def step_collectives(stage: int, params: int, persistent: int, accum: int, feature_caching: bool,
                     features: int, comm_bytes: int = BF16, param_bytes: int = BF16) -> list[Collective]:
    """The collectives of one optimizer step (module doc). `persistent`: elements ZeRO-3 keeps whole on
    every rank; `features`: bytes of the gathered features (`feature_bytes`)."""
    loss = [Collective("all-gather", features, 1), Collective("reduce-scatter", features, 1)]
    if stage in (0, 1):
        return loss + [Collective("all-reduce", params * comm_bytes, 1)] + (
            [Collective("all-gather", params * param_bytes, 1)] if stage == 1 else [])
    if stage == 3:
        passes = 2 + (1 if feature_caching else 0)
        return loss + [Collective("all-gather", (params - persistent) * param_bytes, passes * accum),
                       Collective("all-gather", persistent * param_bytes, 1),
                       Collective("reduce-scatter", params * comm_bytes, accum)]
    raise ValueError(f"ZeRO stage {stage}: only 0, 1 and 3 are counted")


def bytes_per_gpu(collectives: list[Collective], world_size: int) -> float:
    return sum(c.sent_per_gpu(world_size) for c in collectives) if world_size > 1 else 0.0


@dataclass(frozen=True)
class Fabric:
    """Per-GPU bandwidth in one direction, bytes/s: within a node (NVLink) and across nodes (the GPU's
    share of the node's InfiniBand), and the share of it collectives reach."""
    gpus_per_node: int
    nvlink: float
    network: float
    efficiency: float

    def seconds(self, sent_bytes: float, world_size: int) -> float:
        """A ring within one node runs at NVLink speed; one that spans nodes at the network's."""
        link = self.nvlink if world_size <= self.gpus_per_node else self.network
        return sent_bytes / (link * self.efficiency)


# H100 SXM: NVLink 4, 900 GB/s per GPU both directions together (450 GB/s each way); a node of 8 with
# one 400 Gb/s NDR InfiniBand port per GPU (8 x 400 Gb/s a node): 50 GB/s per GPU each way.
H100_NODE = Fabric(gpus_per_node=8, nvlink=450e9, network=400e9 / 8, efficiency=0.8)
