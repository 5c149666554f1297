"""`Packed`: the layout of B variable-length sequences concatenated into one (T, D) stream.

The one type that PGS, the towers and attention share (it sits below all three). It is all that
attention needs to know about sequence boundaries: `cu_seqlens` (on the tokens' device; segment i
is rows cu_seqlens[i]:cu_seqlens[i+1]) and `max_seqlen` (a host int bounding every segment's
length, for the kernels' launch grid), the layout of variable-length flash attention.

The first `num_seqs` segments are the B sequences. A layout with a *token budget* (`with_budget`)
has a fixed total T, known on the host before the device has computed the lengths: the rows past
the sequences form padding segments, each of length >= 1 and <= max_seqlen, whose outputs nobody
reads. Attention never mixes segments, so padding changes no sequence's result and receives no
gradient, and the shapes of the step are static: no host sync, one compiled shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so back-ends can cache per layout
class Packed:
    cu_seqlens: torch.Tensor  # (S+1,) int32, cu_seqlens[0] = 0, cu_seqlens[-1] = T; S >= num_seqs segments
    max_seqlen: int           # >= every segment's length, known on the host
    total_tokens: int         # T, known on the host
    num_seqs: int             # B: the first B segments are the sequences, the rest padding
    host_lengths: torch.Tensor | None = None  # (B,) int64 on the CPU, when known without a sync

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    def segment_lengths(self) -> torch.Tensor:
        """(S,) int32 lengths of every segment, padding included, on the layout's device."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def lengths(self) -> torch.Tensor:
        """(B,) int32 sequence lengths, on the layout's device."""
        return self.segment_lengths()[: self.num_seqs]

    def seq_ids(self) -> torch.Tensor:
        """(T,) int64: the segment each row belongs to (>= num_seqs for padding). No host sync."""
        ids = torch.arange(self.num_segments, device=self.device)
        return torch.repeat_interleave(ids, self.segment_lengths().long(), output_size=self.total_tokens)

    def positions(self) -> torch.Tensor:
        """(T,) int64: each row's position inside its own segment."""
        rows = torch.arange(self.total_tokens, device=self.device)
        return rows - self.cu_seqlens.long()[self.seq_ids()]

    def first_rows(self) -> torch.Tensor:
        """(B,) row index of each sequence's first token (where ViT's CLS sits)."""
        return self.cu_seqlens[: self.num_seqs].long()

    def last_rows(self) -> torch.Tensor:
        """(B,) row index of each sequence's last token (where a packed caption's EOT sits)."""
        return self.cu_seqlens[1 : self.num_seqs + 1].long() - 1

    @property
    def is_uniform(self) -> bool:
        """All rows in B sequences of length max_seqlen, no padding (decided from host ints: no sync)."""
        return self.num_segments == self.num_seqs and self.total_tokens == self.num_seqs * self.max_seqlen

    @staticmethod
    def from_lengths(lengths: torch.Tensor | list[int], device: torch.device | str | None = None) -> Packed:
        """Layout of sequences with these lengths. Give host lengths (a list or a CPU tensor):
        max and total are read from them without touching the device."""
        host = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
        if host.ndim != 1 or host.numel() == 0 or bool((host < 1).any()):
            raise ValueError(f"need a non-empty 1-D list of positive lengths, got {host.tolist()}")
        cu = torch.zeros(host.numel() + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(host, 0)
        target = torch.device(device) if device is not None else torch.device("cpu")
        return Packed(cu.to(target, non_blocking=True), int(host.max()), int(cu[-1]), host.numel(), host)

    @staticmethod
    def from_device_lengths(lengths_B: torch.Tensor, host_lengths: list[int]) -> Packed:
        """Layout of sequences whose lengths live on the device, when the host holds the same
        lengths as a list (text lengths the loader counted from the same token ids): total and
        max come from the list, cu_seqlens from the device tensor. No sync, no copy."""
        if len(host_lengths) != lengths_B.numel():
            raise ValueError(f"{len(host_lengths)} host lengths for {lengths_B.numel()} sequences")
        cu = torch.zeros(lengths_B.numel() + 1, dtype=torch.int32, device=lengths_B.device)
        cu[1:] = torch.cumsum(lengths_B, 0)
        return Packed(cu, max(host_lengths), sum(host_lengths), lengths_B.numel(),
                      torch.as_tensor(host_lengths, dtype=torch.int64))

    @staticmethod
    def uniform(num_seqs: int, seqlen: int, device: torch.device | str | None = None) -> Packed:
        """B sequences of the same length: the plain (B, S, D) batch, flattened."""
        cu = torch.arange(0, (num_seqs + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
        return Packed(cu, seqlen, num_seqs * seqlen, num_seqs, torch.full((num_seqs,), seqlen, dtype=torch.int64))

    @staticmethod
    def budget_for(num_seqs: int, min_len: int, max_len: int) -> tuple[int, int]:
        """(total tokens T, padding segments P) of the budget for B sequences of min_len..max_len
        rows: T = B max_len + P, with P just enough that padding segments of length 1..max_len
        always fill T exactly (at least P rows of padding, at most B (max_len - min_len) + P)."""
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
        pads = max(1, math.ceil(num_seqs * (max_len - min_len) / (max_len - 1))) if max_len > 1 else 1
        return num_seqs * max_len + pads, pads

    @staticmethod
    def with_budget(lengths_B: torch.Tensor, min_len: int, max_len: int) -> Packed:
        """Layout of B sequences whose lengths (in min_len..max_len) live on the device, padded to
        the static budget of `budget_for`: the padding is split evenly over P segments, each
        1..max_len rows long. Nothing is read back from the device."""
        B = lengths_B.numel()
        total, pads = Packed.budget_for(B, min_len, max_len)
        lengths_B = lengths_B.to(torch.int64)
        padding = total - lengths_B.sum()                                       # 0-d, on the device
        extra = torch.arange(pads, device=lengths_B.device) < padding % pads
        pad_lengths_P = padding // pads + extra                                 # (P,), each 1..max_len
        cu = torch.zeros(B + pads + 1, dtype=torch.int32, device=lengths_B.device)
        cu[1:] = torch.cumsum(torch.cat([lengths_B, pad_lengths_P]), 0)
        return Packed(cu, max_len, total, B)
