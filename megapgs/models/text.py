"""The text tower: token + positional embedding -> causal packed blocks -> pooling at EOT -> projection.

OpenCLIP's text transformer, parameter for parameter (`token_embedding`, `positional_embedding`,
`transformer`, `ln_final`, `text_projection`). Packed, each caption runs only up to its EOT token
as its own causal segment; with causal attention the EOT output depends on nothing after it, so
this is exactly the padded result, without the padding.
"""
from __future__ import annotations

import torch
from torch import nn

from megapgs.models.archs import TextSpec
from megapgs.models.blocks import Transformer
from megapgs.models.partitioned import modifying
from megapgs.packed import Packed


def eot_lengths(tokens_BC: torch.Tensor) -> torch.Tensor:
    """(B,) tokens up to and including EOT, OpenCLIP's highest token id (its argmax). Call it on
    host token ids (the loader does) so that packing needs no device sync."""
    return tokens_BC.argmax(dim=-1) + 1


class TextTower(nn.Module):
    def __init__(self, spec: TextSpec, embed_dim: int):
        super().__init__()
        self.spec = spec
        self.token_embedding = nn.Embedding(spec.vocab_size, spec.width)
        self.positional_embedding = nn.Parameter(torch.empty(spec.context_length, spec.width))
        self.transformer = Transformer(spec.width, spec.layers, spec.heads, spec.mlp_width, causal=True)
        self.ln_final = nn.LayerNorm(spec.width)
        self.text_projection = nn.Parameter(torch.empty(spec.width, embed_dim))
        with modifying([self.token_embedding.weight]):  # a child's: partitioned under zero.Init
            nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=spec.width**-0.5)

    def forward(self, tokens_BC: torch.Tensor, lengths: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """tokens (B, C) padded after EOT; `lengths` (host, from `eot_lengths`) packs the captions,
        None runs all C positions of every caption (OpenCLIP's way) and pools at EOT."""
        B, C = tokens_BC.shape
        if C > self.spec.context_length:
            raise ValueError(f"captions of {C} tokens exceed the context length {self.spec.context_length}")
        if lengths is None:
            packed = Packed.uniform(B, C, device=tokens_BC.device)
            ids_T = tokens_BC.reshape(B * C)
            pos_T = torch.arange(C, device=tokens_BC.device).repeat(B)
            pool_rows = torch.arange(B, device=tokens_BC.device) * C + tokens_BC.argmax(dim=-1)
        else:
            # cu_seqlens from the device's own token ids (no host-to-device copy); T and the max
            # length from the host's lengths, which the loader counted from the same ids
            if isinstance(lengths, torch.Tensor):  # a host tensor from eot_lengths; training passes a list
                lengths = lengths.tolist()
            packed = Packed.from_device_lengths(eot_lengths(tokens_BC), list(lengths))
            seq_T, pos_T = packed.seq_ids(), packed.positions()
            ids_T = tokens_BC[seq_T, pos_T]  # the tokens up to each EOT, concatenated
            pool_rows = packed.last_rows()  # EOT closes each segment
        x_TD = self.token_embedding(ids_T) + self.positional_embedding[pos_T]
        x_TD = self.transformer(x_TD, packed)
        return self.ln_final(x_TD[pool_rows]) @ self.text_projection
