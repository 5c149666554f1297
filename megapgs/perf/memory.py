"""Memory per rank of a training run, predicted from its config, its ranks and its device alone.

No model is built: parameters are counted from the ArchSpec (perf/param_count.py), activations
from the rows each tower sees (perf/activations.py), and the model states and ZeRO's buffers from
what DeepSpeed allocates under the configured stage (perf/zero_memory.py).

A step passes through phases, each with its own live set: start-up (the model as built, fp32,
before DeepSpeed flattens, converts or partitions it), forward and backward (activations, gathered
parameters), the loss on cached features (feature caching: all micro-batches' inputs, the whole
batch's logits), the gradient reduce, and the optimizer step (the flat fp32 gradient copy).
How phases add up to a peak is the allocator's business (MemoryEstimate).

On the CPU a rank's memory is its resident set: the interpreter with torch, DeepSpeed, open_clip
and the loop imported, the process group and the tokenizer (CPU_BASELINE_BYTES, measured), plus
the modules DeepSpeed imports for ZeRO-3 only. On a GPU the CUDA context (CUDA_CONTEXT_BYTES) comes
on top of what PyTorch's allocator holds; the allocator's fragmentation is not counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megapgs.config import Config
from megapgs.perf.activations import (TowerShape, backward_working, image_stream, logits_bytes, text_stream,
                                      tower_activations)
from megapgs.perf.param_count import count_params
from megapgs.perf.zero_memory import FP32, Term, ZeroSettings, held_as, start_up_terms, zero_terms
from megapgs.train.plan import RunPlan

DTYPE_BYTES = {"fp32": 4, "float32": 4, "float": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2}

# A training rank's resident set before anything model-sized: Python, torch 2.14 (CPU build with
# its CUDA libraries mapped), DeepSpeed 0.19, open_clip, the loop's modules, the process group, the
# tokenizer, the loader. Measured with `python tools/measure_memory.py --baseline` (a 1-step,
# micro-batch-1 run of tiny-32: its peak RSS less this module's estimate of everything else) on the
# 2-core CPU machine, 2026-12-03; BENCHMARKS.md has the run.
CPU_BASELINE_BYTES = 877_286_416   # 836.6 MiB
# What a ZeRO-3 engine adds to that on the CPU: deepspeed.initialize imports ~580 more modules for
# stage 3 (networkx, functorch.compile, triton ops, ...). Same measurement, under ZeRO-3, less the above.
CPU_ZERO3_RUNTIME_BYTES = 51_951_052   # 49.5 MiB
# The CUDA context of a process (PyTorch's kernels loaded on the device), which the caching
# allocator does not count: 781 MB in nvidia-smi for a process that only initialised CUDA
# (pytorch/pytorch#34323); lazy module loading (CUDA >= 11.7) lowers it, NCCL's buffers add to it.
CUDA_CONTEXT_BYTES = 781 * 10**6
# DALI's decoder: each of its prefetch_queue_depth (2, data/dali.py) slots holds the batch's decoded
# crops (RGB uint8, counted at 256 x 256: img2dataset's default image_size, the usual LAION shard
# size) and its (3, S, S) float32 output; the loader copies one output into a torch tensor.
DALI_PREFETCH_DEPTH = 2
DALI_DECODED_SIDE = 256


@dataclass(frozen=True)
class MemoryEstimate:
    """Each term and the phases of a step (each the set of terms live at once).

    On a GPU the peak is the largest phase: PyTorch's caching allocator hands a freed block to the
    next request, so what one phase frees the next reuses. On the CPU the resident set follows
    glibc's malloc: a transient below its mmap threshold (dynamic, at most 32 MiB on 64-bit) comes
    from the heap, and freed heap memory stays resident to be reused, so the heap settles at the
    largest heap use of any phase (the start-up model that DeepSpeed copies and frees included);
    larger transients are mapped and returned on free. The CPU's peak is therefore what lives all
    along, plus the heap's largest phase, plus the mapped transients' largest phase."""
    device: str
    terms: dict[str, Term]
    phases: dict[str, tuple[str, ...]]     # phase -> the terms live in it
    checkpointing: bool                   # the configured activation checkpointing
    other_activations: int                # the activations under the other setting
    notes: tuple[str, ...] = field(default=())

    def phase_bytes(self, phase: str, sizes: dict[str, int] | None = None) -> int:
        sizes = sizes or {}
        return sum(sizes.get(name, self.terms[name].bytes) for name in self.phases[phase])

    def _held(self, phase: str, held: str, sizes: dict[str, int]) -> int:
        return sum(sizes.get(name, self.terms[name].bytes) for name in self.phases[phase]
                   if self.terms[name].held == held)

    def _peak(self, sizes: dict[str, int]) -> tuple[int, str]:
        if self.device != "cpu":
            phase = max(self.phases, key=lambda p: self.phase_bytes(p, sizes))
            return self.phase_bytes(phase, sizes), phase
        heap = max(self.phases, key=lambda p: self._held(p, "heap", sizes))
        mapped = max(self.phases, key=lambda p: self._held(p, "mapped", sizes))
        always = sum(sizes.get(t.name, t.bytes) for t in self.terms.values() if t.held == "always")
        total = always + self._held(heap, "heap", sizes) + self._held(mapped, "mapped", sizes)
        if heap == mapped or not self._held(mapped, "mapped", sizes):
            return total, heap
        return total, f"{heap}'s heap + {mapped}'s mapped transients"

    @property
    def peak_bytes(self) -> int:
        return self._peak({})[0]

    @property
    def peak_phase(self) -> str:
        return self._peak({})[1]

    def peak_with_other_checkpointing(self) -> int:
        """The peak were activation checkpointing switched the other way."""
        return self._peak({"activations": self.other_activations})[0]


def estimate_memory(cfg: Config, plan: RunPlan, device: str) -> MemoryEstimate:
    """Bytes per rank of `cfg` run as `plan` on `device` ("cpu" or "cuda")."""
    N = plan.world_size
    zs = ZeroSettings.from_config(cfg)
    counts, tensors = count_params(plan.arch, siglip=cfg.train.loss == "siglip")
    P, c = counts.total, DTYPE_BYTES[cfg.precision]
    accum = cfg.deepspeed.get("data_types", {}).get("grad_accum_dtype")
    g = DTYPE_BYTES[accum] if accum else (FP32 if cfg.precision == "bf16" else c)

    terms = [Term("runtime", CPU_BASELINE_BYTES + (CPU_ZERO3_RUNTIME_BYTES if zs.stage == 3 else 0),
                  "Python, torch, DeepSpeed, open_clip, tokenizer, process group (measured)"
                  + (" + ZeRO-3's modules" if zs.stage == 3 else "")) if device == "cpu" else
             Term("runtime", CUDA_CONTEXT_BYTES, "CUDA context (pytorch/pytorch#34323)")]
    terms += zero_terms(P, tensors, counts.largest_block, zs, N, c, g, device)
    start = start_up_terms(tensors, zs, c, N, cfg.model.partitioned_init)
    terms += start + step_terms(cfg, plan, c, zs.stage, device)
    by_name = {t.name: t for t in terms}
    always = [t.name for t in terms if t.held == "always"]
    gathered = [name for name in by_name if name.startswith("gathered parameters")]
    inputs = ["input micro-batches"]
    reduce = ["reduce buffer"] if "reduce buffer" in by_name else []
    mid_backward = reduce if zs.stage == 3 and P > zs.reduce_bucket_size else []  # the bucket fills in backward
    phases = {
        "start-up": ("runtime", *(t.name for t in start)) if start else ("runtime", "parameters"),
        "forward/backward": tuple(always + inputs + gathered + mid_backward + ["activations", "backward working set"]
                                  + ([] if plan.feature_caching else ["contrastive logits"])),
    }
    if plan.feature_caching:
        phases["loss on cached features"] = tuple(always + inputs + ["contrastive logits"])
    if reduce:
        phases["gradient reduce"] = tuple(always + gathered + reduce)
    phases["optimizer step"] = tuple(always + (["step: flat gradients"] if "step: flat gradients" in by_name else []))
    other = activation_bytes(cfg, plan, c, device, not cfg.model.grad_checkpointing)[0]
    notes = ("PGS's selection (B x L x L fp32 similarity and transport plans) runs in the forward without "
             "gradients, before the towers' activations exist: not at the peak",)
    return MemoryEstimate(device, by_name, phases, cfg.model.grad_checkpointing, other, notes)


def activation_bytes(cfg: Config, plan: RunPlan, c: int, device: str, checkpointing: bool) -> tuple[int, int, int, str]:
    """(activations, backward working set, largest activation tensor, description) of one micro-batch."""
    arch, B = plan.arch, plan.micro_batch_size
    v, t = arch.vision, arch.text
    unmasked_steps = cfg.pgs.unmasked_tail > 0 and round(cfg.pgs.unmasked_tail * plan.total_steps) > 0
    images = image_stream(B, plan.kept_tokens, v.num_patches, cfg.pgs.masking, unmasked_steps, plan.static_packing)
    texts = text_stream(B, t.context_length)
    varlen = uses_varlen(cfg.model.attention, device, cfg.precision)
    towers = ((TowerShape(v.width, v.mlp_width, v.heads, v.layers), images),
              (TowerShape(t.width, t.mlp_width, t.heads, t.layers), texts))
    fixed = B * 3 * v.image_size**2 * c + c * images.tokens * v.width  # conv1's input, ln_pre's input
    saved = fixed + sum(tower_activations(shape, stream, c, varlen, checkpointing) for shape, stream in towers)
    working = max(backward_working(shape, stream, c, varlen) for shape, stream in towers)
    largest = max(c * stream.tokens * max(shape.mlp_width, 3 * shape.width) for shape, stream in towers)
    text = (f"image tower {images.tokens:,} rows, text {texts.tokens:,} rows, "
            f"{'varlen' if varlen else 'padded SDPA'} attention, checkpointing {'on' if checkpointing else 'off'}")
    return saved, working, largest, text


def step_terms(cfg: Config, plan: RunPlan, c: int, stage: int, device: str) -> list[Term]:
    """What one step's data makes: activations, the backward's gradients, logits, inputs, DALI's buffers."""
    arch, N, B, A = plan.arch, plan.world_size, plan.micro_batch_size, plan.grad_accum_steps
    saved, working, largest, text = activation_bytes(cfg, plan, c, device, cfg.model.grad_checkpointing)
    held = held_as(largest)
    counts, _ = count_params(arch)
    block_grads = counts.largest_block * c if stage >= 2 else 0  # a block's whole gradients before the bucket
    rows = B * A if plan.feature_caching else B
    columns = plan.contrastive_batch_size if plan.feature_caching else B * N
    features = 2 * columns * arch.embed_dim * FP32 * 2  # image and text features, fp32, and their gradients
    logits = logits_bytes(cfg.train.loss, cfg.train.local_loss, rows, columns)
    images = B * 3 * arch.vision.image_size**2 * c
    batches = A if plan.feature_caching else 1
    terms = [Term("activations", saved, text, held),
             Term("backward working set", working + block_grads, "one block's gradients in flight", held),
             Term("contrastive logits", logits + features, f"{rows:,} x {columns:,} fp32" + (
                 "" if cfg.train.local_loss or rows == columns else f" (the whole {columns:,}-square)"),
                  held_as(rows * columns * FP32)),
             Term("input micro-batches", batches * (images + B * arch.text.context_length * 8),
                  f"{batches} x ({B} images + captions)" + (", all held for the feature cache"
                                                            if plan.feature_caching else ""), held_as(images))]
    dali = dali_bytes(cfg, B, arch.vision.image_size, device)
    if dali:
        terms.append(Term("DALI buffers", dali, f"{DALI_PREFETCH_DEPTH} decoder slots + one copy"))
    return terms


def uses_varlen(requested: str, device: str, precision: str) -> bool:
    """Whether the attention back-end keeps no padded grid: a varlen kernel (torch_varlen,
    flash_attn, xformers), which `auto` picks on CUDA in bf16/fp16 (models/attention.py)."""
    if requested in ("torch_varlen", "flash_attn", "xformers"):
        return device == "cuda"
    return requested == "auto" and device == "cuda" and precision != "fp32"


def dali_bytes(cfg: Config, batch: int, image_size: int, device: str) -> int:
    """Device memory of the DALI decoder (GPU decoding only; its CPU mode and the other loaders hold
    host memory)."""
    if device != "cuda" or cfg.data.source == "synthetic" or cfg.data.loader not in ("auto", "dali"):
        return 0
    slot = batch * (3 * DALI_DECODED_SIDE**2 + 3 * image_size**2 * FP32)
    return DALI_PREFETCH_DEPTH * slot + batch * 3 * image_size**2 * FP32

