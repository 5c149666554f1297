"""The metrics of the steps since the last log point, kept on the device until they are fetched.

Nothing here reads the device during a step: losses, keep ratios, mask checksums and the image
token counts that FLOPs need accumulate as device tensors (text lengths and a checksum of the sample
keys are host ints from the loader). `fetch`, every `log.every_steps` steps, reduces them over ranks with the loader's skip
counts in one collective and reads them in one transfer: the only sync of the loop.
"""
from __future__ import annotations

import hashlib
import time
from typing import Sequence

import torch

from megapgs.data.faults import REASONS, SkipCounter
from megapgs.dist import DistInfo, all_reduce_sum
from megapgs.models.archs import ArchSpec
from megapgs.perf.flops import clip_forward_flops_from_sums

# the device-side sums, in the order of the fetched vector
_DEVICE_SUMS = ("loss", "keep", "logit_scale", "mask_checksum", "image_tokens", "image_sq")


class Window:
    def __init__(self, device: torch.device, arch: ArchSpec):
        self.device, self.arch = device, arch
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(_DEVICE_SUMS), dtype=torch.float64, device=self.device)
        self.micro_batches = self.steps = self.samples = 0
        self.images = self.texts = self.text_tokens = self.text_sq = 0
        self.stream_tokens = 0  # rows of the image streams, a token budget's padding included
        self.keys_checksum = 0  # the sample keys seen (a 20-bit hash each, summed: exact in float64 sums)
        self.started = time.perf_counter()

    def _add(self, name: str, value: torch.Tensor | float) -> None:
        self.sums[_DEVICE_SUMS.index(name)] += value

    def add_micro_batch(self, selection, batch_size: int, text_lengths: list[int], keys: Sequence[str] = ()) -> None:
        """One micro-batch: its Selection (None when unmasked), its caption lengths and sample keys."""
        self.keys_checksum += sum(int.from_bytes(hashlib.blake2b(k.encode(), digest_size=3).digest(), "little") >> 4
                                  for k in keys)
        self.micro_batches += 1
        self.images += batch_size
        self.texts += len(text_lengths)
        self.text_tokens += sum(text_lengths)
        self.text_sq += sum(n * n for n in text_lengths)
        if selection is None:
            full = self.arch.vision.num_patches + 1
            self.stream_tokens += batch_size * full
            self._add("keep", 1.0)
            self._add("image_tokens", float(batch_size * full))
            self._add("image_sq", float(batch_size * full * full))
            return
        self.stream_tokens += selection.packed.total_tokens
        self._add("keep", selection.stats["keep_ratio_mean"])
        lengths = (selection.counts + 1).double()  # the sequences' own rows, not a budget's padding
        self._add("image_tokens", lengths.sum())
        self._add("image_sq", lengths.square().sum())
        kept = selection.kept_idx.to(torch.float64)  # equal masks give equal sums (resume checks)
        weights = torch.arange(1, kept.numel() + 1, dtype=torch.float64, device=kept.device).view_as(kept)
        self._add("mask_checksum", (kept * weights).sum())

    def add_step(self, loss: torch.Tensor, logit_scale: torch.Tensor, global_batch_size: int) -> None:
        self.steps += 1
        self.samples += global_batch_size
        self._add("loss", loss.detach())
        self._add("logit_scale", logit_scale.detach())

    def fetch(self, dist: DistInfo, skips: SkipCounter, peak_flops: float | None) -> dict[str, float]:
        """Reduce over ranks and read on the host, with the loader's skip counts (one collective)."""
        host = torch.tensor([self.images, self.texts, self.text_tokens, self.text_sq, self.stream_tokens,
                             self.keys_checksum, *(skips.counts[r] for r in REASONS)], dtype=torch.float64)
        values = all_reduce_sum(torch.cat([self.sums, host.to(self.device)]), dist).tolist()
        sums = dict(zip(_DEVICE_SUMS, values))
        images, texts, text_tokens, text_sq, stream_tokens, keys_checksum, *skipped = values[len(_DEVICE_SUMS):]
        seconds = time.perf_counter() - self.started
        steps, W = max(self.steps, 1), dist.world_size
        metrics = {
            "loss": sums["loss"] / steps / W, "keep_ratio": sums["keep"] / max(self.micro_batches, 1) / W,
            "logit_scale": sums["logit_scale"] / steps / W, "mask_checksum": sums["mask_checksum"],
            "samples_checksum": int(keys_checksum),  # equal sample keys, equal sums (exact-resume checks)
            "samples_per_s": self.samples / seconds, "image_tokens_per_s": sums["image_tokens"] / seconds,
            "step_ms": 1e3 * seconds / steps,
            # the share of the image streams' rows that are a token budget's padding (0 when exact)
            "image_padding": 1 - sums["image_tokens"] / stream_tokens if stream_tokens else 0.0,
        }
        flops = 3 * clip_forward_flops_from_sums(self.arch, int(images), int(sums["image_tokens"]),
                                                 int(sums["image_sq"]), int(texts), int(text_tokens),
                                                 int(text_sq))["total"]
        if peak_flops is not None and seconds > 0:
            metrics["mfu"] = flops / seconds / W / peak_flops
        if self.device.type == "cuda":  # the caching allocator's own count: no sync
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        metrics.update({f"skipped_{r}": int(n) for r, n in zip(REASONS, skipped) if n})
        return metrics

