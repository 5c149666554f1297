"""OpenCLIP's tokenizer, sized by our model spec.

The BPE vocabulary ships inside open_clip (no network). The context length is the text tower's
(`get_arch(name).text.context_length`: 77 for the OpenCLIP-sized towers, 16 for the tiny ones);
captions longer than that are cut, and OpenCLIP puts EOT in the last position.
"""
from __future__ import annotations

from typing import Sequence

import open_clip
import torch

from megapgs.models.archs import get_arch
from megapgs.models.text import eot_lengths


class Tokenizer:
    """captions -> (tokens (B, C) int64 on the CPU, lengths: tokens up to and including EOT)."""

    def __init__(self, arch: str):
        spec = get_arch(arch)
        self.context_length = spec.text.context_length
        # An OpenCLIP model name picks that model's tokenizer; our own archs use OpenCLIP's default BPE.
        self._tokenize = open_clip.get_tokenizer(spec.openclip_name or "", context_length=self.context_length)
        vocab_size = getattr(self._tokenize, "vocab_size", None)
        if vocab_size is not None and vocab_size > spec.text.vocab_size:
            raise ValueError(f"{arch}: the tokenizer has {vocab_size} tokens but the text tower embeds "
                             f"{spec.text.vocab_size}")
        self.eot_token_id = int(self._tokenize.eot_token_id)

    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        if isinstance(captions, str):
            raise TypeError("pass a list of captions, not one string")
        tokens_BC = self._tokenize(list(captions)).to(torch.int64)
        # EOT is the highest id, so its position is the argmax (what the text tower pools at).
        return tokens_BC, eot_lengths(tokens_BC).tolist()
