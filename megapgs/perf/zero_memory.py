"""The model states and ZeRO's buffers of one rank, as DeepSpeed 0.19 allocates them.

Read in deepspeed/runtime/engine.py, runtime/zero/stage_1_and_2.py, stage3.py,
partitioned_param_coordinator.py, parameter_offload.py and runtime/comm/coalesced_collectives.py
(P parameters, N ranks, c bytes of the compute dtype, g of data_types.grad_accum_dtype):

    stage 0    parameters and gradients whole (P c each), AdamW's two fp32 moments whole (8P), fp32
               master weights when c is not fp32; with several ranks the gradients are flattened into
               one buffer of up to 5e8 elements for the all-reduce (engine.allreduce_bucket).
    stage 1/2  parameters whole; fp32 master weights, moments and the fp32 gradient partition divided
               by the ranks; stage 1 keeps whole gradients (g) and flattens up to a reduce bucket of them
               for the reduce; stage 2 a reduce bucket (two with overlap_comm) and the partition.
    stage 3    partitions of the parameters (c), of the fp32 master weights (a copy even when c is
               fp32: stage3.py's aliasing branch compares a torch.device with the device's name and is
               never taken), of the moments and of the gradients (grad_partitions_flat_buffer, g);
               parameters of at most stage3_param_persistence_threshold elements whole everywhere;
               the reduce bucket (reduce_bucket_size elements, c; the CPU keeps only the pages written:
               min(P, bucket)); and the parameters gathered for forward and backward. A gathered
               parameter is released only when its next use in the recorded trace is more than
               stage3_max_reuse_distance elements away, so from the second step on up to that distance
               + the prefetch bucket + one block stays gathered, at most every partitioned parameter (a
               model below 1e9 elements stays whole on every rank until the optimizer step). On one
               rank "gathering" is a view of the partition.
               The reduce (reduce_scatter: true, the default) concatenates the bucket's gradients
               (torch.cat in reduce_scatter_coalesced: min(P, bucket) x c) and, on the CPU, gloo's
               reduce-scatter takes as much again (measured: tools/measure_memory.py); the partitions
               are converted to g when g is not c.
    every stage the optimizer step flattens the fp32 gradient partition of each parameter group.
"""
from __future__ import annotations

from dataclasses import dataclass

from megapgs.config import Config
from megapgs.perf.param_count import ParamTensor, gather_units

FP32 = 4
ADAM_MOMENTS = 2                 # AdamW's exp_avg and exp_avg_sq, fp32 (torch.optim.AdamW, fused)
ALLREDUCE_BUFFER_ELEMENTS = 500_000_000  # engine.MEMORY_OPT_ALLREDUCE_SIZE: ZeRO-0's flat all-reduce buffer
# glibc malloc's largest mmap threshold on 64-bit (mallopt(3): DEFAULT_MMAP_THRESHOLD_MAX, 4 * 1024 *
# 1024 * sizeof(long)): the CPU's allocator maps transients from this size on (memory.MemoryEstimate).
MMAP_THRESHOLD_MAX = 32 * 2**20


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    note: str
    held: str = "always"   # "always" (the whole run), or a transient: "heap" or "mapped" (the CPU's allocator)


def held_as(largest_tensor_bytes: int) -> str:
    """How the CPU's allocator holds a transient whose largest tensor is this big."""
    return "mapped" if largest_tensor_bytes >= MMAP_THRESHOLD_MAX else "heap"


@dataclass(frozen=True)
class ZeroSettings:
    stage: int
    reduce_bucket_size: int
    prefetch_bucket_size: int
    param_persistence_threshold: int
    max_reuse_distance: int
    overlap_comm: bool
    contiguous_gradients: bool
    reduce_scatter: bool
    offload: bool

    @classmethod
    def from_config(cls, cfg: Config) -> ZeroSettings:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig  # DeepSpeed's own defaults

        zero = DeepSpeedZeroConfig(**cfg.deepspeed.get("zero_optimization", {}))
        offload = any(getattr(o, "device", "none") not in (None, "none")
                      for o in (zero.offload_optimizer, zero.offload_param) if o is not None)
        return cls(int(zero.stage), int(zero.reduce_bucket_size), int(zero.prefetch_bucket_size),
                   int(zero.param_persistence_threshold), int(zero.max_reuse_distance), bool(zero.overlap_comm),
                   bool(zero.contiguous_gradients), bool(zero.reduce_scatter), offload)

    def describe(self) -> str:
        text = f"stage {self.stage}"
        if self.stage >= 2:
            text += f", reduce bucket {self.reduce_bucket_size:,} elements"
        if self.stage == 3:
            text += (f", prefetch bucket {self.prefetch_bucket_size:,}, persistence threshold "
                     f"{self.param_persistence_threshold:,}, max reuse distance {self.max_reuse_distance:,}")
        text += f", overlap_comm {self.overlap_comm}, contiguous_gradients {self.contiguous_gradients}"
        return text + (", offload configured (not modelled: the estimate keeps everything on the device)"
                       if self.offload else "")


def zero_terms(P: int, tensors: list[ParamTensor], largest_block: int, zs: ZeroSettings, N: int, c: int,
               g: int, device: str) -> list[Term]:
    """The model states (held all along) and ZeRO's transients, in bytes per rank (module doc)."""
    part = -(-P // N)
    moments = Term("optimizer state", ADAM_MOMENTS * FP32 * (P if zs.stage == 0 else part),
                   "AdamW exp_avg + exp_avg_sq, fp32" + (f", 1/{N}" if zs.stage else ", whole"))
    filled = min(P, zs.reduce_bucket_size)  # gradients in the bucket when it is reduced
    terms = []
    if zs.stage == 0:
        terms += [Term("parameters", P * c, f"{P:,} x {c} B, whole"),
                  Term("gradients", P * c, "whole, compute dtype")]
        if c != FP32:
            terms.append(Term("master weights", P * FP32, "fp32 copy, whole"))
        terms.append(moments)
        if N > 1:
            size = min(P, ALLREDUCE_BUFFER_ELEMENTS) * c
            terms.append(Term("reduce buffer", size, "the gradients flattened for the all-reduce", held_as(size)))
    else:
        persistent = sum(p.numel for p in tensors if p.numel <= zs.param_persistence_threshold) if zs.stage == 3 else 0
        terms.append(Term("parameters", P * c, f"{P:,} x {c} B, whole") if zs.stage < 3 else
                     Term("parameters", part * c + persistent * c,
                          f"1/{N} of {P:,} x {c} B + {persistent:,} persistent elements whole"))
        terms.append(Term("master weights", part * FP32, f"fp32 copy, 1/{N}"))
        terms.append(moments)
        terms.append(Term("gradients", P * g, f"whole, {g} B accumulation dtype") if zs.stage == 1 else
                     Term("gradients", part * g, f"1/{N}, {g} B accumulation dtype"))
        allocated = filled if device == "cpu" else zs.reduce_bucket_size  # the CPU keeps only the pages written
        bucket = f"{zs.reduce_bucket_size:,} elements" + (f", {filled:,} of them written" if device == "cpu" else "")
        if zs.stage == 1 and N > 1:
            terms.append(Term("reduce buffer", filled * c, "the gradients flattened for the reduce",
                              held_as(filled * c)))
        if zs.stage == 2:
            buckets = 2 if zs.overlap_comm else 1
            terms.append(Term("reduce buckets", buckets * allocated * c, f"{buckets} x {bucket}"))
        if zs.stage == 3:
            terms.append(Term("reduce bucket", allocated * c, bucket))
            if zs.reduce_scatter:  # concatenated (and on gloo copied again), the partition converted to g
                copies = 2 if device == "cpu" else 1
                size = copies * filled * c + (part * g if g != c else 0)
                note = f"{copies} x the {filled:,} bucketed gradients concatenated for the reduce-scatter"
            else:  # reduced in the bucket, the bucket converted to g
                size, note = (filled * g if g != c else 0), "the reduced bucket in the accumulation dtype"
            if size:
                terms.append(Term("reduce buffer", size, note + (", the partition in the accumulation dtype"
                                                                 if g != c and zs.reduce_scatter else ""),
                                  held_as(filled * c)))
            if N > 1:
                terms += gathered_terms(tensors, zs, largest_block, c, device)
    flat = part * FP32 if zs.stage else (P * FP32 if c != FP32 else 0)
    if flat:
        terms.append(Term("step: flat gradients", flat, "the fp32 gradient partition flattened for the optimizer",
                          held_as(flat)))
    return terms


def gathered_terms(tensors: list[ParamTensor], zs: ZeroSettings, largest_block: int, c: int,
                   device: str) -> list[Term]:
    """ZeRO-3's gathered parameters from the second step on (module doc); on the CPU each gathered
    unit (a block, or a tensor outside the blocks) held as its size says."""
    units = gather_units(tensors, zs.param_persistence_threshold)
    total = sum(units)
    live = min(total, zs.max_reuse_distance + zs.prefetch_bucket_size + largest_block)
    note = (f"elements in the compute dtype, kept gathered until the step (max reuse distance "
            f"{zs.max_reuse_distance:,})")
    if device != "cpu" or not total:
        return [Term("gathered parameters", live * c, f"{live:,} " + note, held_as(live * c))]
    terms = []
    for held in ("heap", "mapped"):
        size = round(sum(u for u in units if held_as(u * c) == held) * live / total)
        if size:
            name = "gathered parameters" + (" (mapped)" if held == "mapped" else "")
            terms.append(Term(name, size * c, f"{size:,} " + note, held))
    return terms


def start_up_terms(tensors: list[ParamTensor], zs: ZeroSettings, c: int, N: int, partitioned: bool) -> list[Term]:
    """The model as built (fp32, one tensor per parameter) before DeepSpeed takes it: stage 1-3 copy
    it into flat buffers and free it, as does a change of dtype; stage 0 in fp32 keeps it as the
    parameters (then it is no transient of its own: []). Under ZeRO-3 with model.partitioned_init
    (deepspeed.zero.Init, train/engine.py) each rank builds only its shards (parameters up to the
    persistence threshold whole) and holds one block or tensor whole at a time, while the init scheme
    sets it."""
    if zs.stage == 0 and c == FP32:
        return []
    shards = zs.stage == 3 and partitioned

    def built(numel: int) -> int:
        return -(-numel // N) if shards and numel > zs.param_persistence_threshold else numel

    terms = []
    for held in ("heap", "mapped"):
        size = sum(built(p.numel) * FP32 for p in tensors if held_as(built(p.numel) * FP32) == held)
        if size:
            terms.append(Term("start-up model" + (" (mapped)" if held == "mapped" else ""), size,
                              ("this rank's shards, fp32, as zero.Init builds them" if shards else
                               "the model as built, fp32, before DeepSpeed flattens or converts it"), held))
    if shards and N > 1:
        whole = max(gather_units(tensors, zs.param_persistence_threshold)) * FP32
        terms.append(Term("start-up: a module whole", whole, "the largest block or tensor, gathered for its init",
                          held_as(whole)))
    return terms
