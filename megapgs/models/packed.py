"""`Packed`: the layout of B variable-length sequences concatenated into one (T, D) stream.

This is the only thing attention needs to know about sequence boundaries: `cu_seqlens`
(B+1, int32, on the tokens' device; sequence i is rows cu_seqlens[i]:cu_seqlens[i+1]) and
`max_seqlen` (a host int, for the kernels' launch grid). It is the layout of variable-length
flash attention; B sequences of equal length are the special case `Packed.uniform`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so back-ends can cache per layout
class Packed:
    cu_seqlens: torch.Tensor  # (B+1,) int32, cu_seqlens[0] = 0, cu_seqlens[-1] = T
    max_seqlen: int           # max_i (cu_seqlens[i+1] - cu_seqlens[i]), known on the host
    total_tokens: int         # T, known on the host
    host_lengths: torch.Tensor | None = None  # (B,) int64 on the CPU, when known (FLOP counts)

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    def lengths(self) -> torch.Tensor:
        """(B,) int32 sequence lengths, on the layout's device."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def seq_ids(self) -> torch.Tensor:
        """(T,) int64: the sequence each row belongs to. No host sync (T is known)."""
        ids = torch.arange(self.num_seqs, device=self.device)
        return torch.repeat_interleave(ids, self.lengths().long(), output_size=self.total_tokens)

    def positions(self) -> torch.Tensor:
        """(T,) int64: each row's position inside its own sequence."""
        rows = torch.arange(self.total_tokens, device=self.device)
        return rows - self.cu_seqlens.long()[self.seq_ids()]

    def first_rows(self) -> torch.Tensor:
        """(B,) row index of each sequence's first token (where ViT's CLS sits)."""
        return self.cu_seqlens[:-1].long()

    def last_rows(self) -> torch.Tensor:
        """(B,) row index of each sequence's last token (where a packed caption's EOT sits)."""
        return self.cu_seqlens[1:].long() - 1

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
        return Packed(cu.to(target, non_blocking=True), int(host.max()), int(cu[-1]), host)

    @staticmethod
    def uniform(num_seqs: int, seqlen: int, device: torch.device | str | None = None) -> Packed:
        """B sequences of the same length: the plain (B, S, D) batch, flattened."""
        cu = torch.arange(0, (num_seqs + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
        return Packed(cu, seqlen, num_seqs * seqlen, torch.full((num_seqs,), seqlen, dtype=torch.int64))

    @property
    def is_uniform(self) -> bool:
        """All sequences of length max_seqlen (decided from host ints: no sync)."""
        return self.total_tokens == self.num_seqs * self.max_seqlen
