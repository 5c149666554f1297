"""Random images and captions, made on the device: the model's throughput without any loading.

`SyntheticLoader` has the CPU loader's surface (endless `Batch`es, `samples_per_epoch`, `skips`,
`state_dict`), so a run or the profiler swaps it in with `data.source: synthetic`. It draws a few
distinct batches once, on the device, and cycles through them: no decoding, no host work per step.
Captions are OpenCLIP-shaped: SOT, random word ids, EOT (the highest id), zero padding.
"""
from __future__ import annotations

from typing import Iterator

import torch

from megapgs.data.faults import SkipCounter
from megapgs.data.wds import Batch

SOT_TOKEN_ID, EOT_TOKEN_ID = 49406, 49407  # OpenCLIP's BPE: start and end of text


class SyntheticLoader:
    def __init__(self, *, batch_size: int, image_size: int, context_length: int, device: torch.device | str,
                 seed: int = 0, distinct_batches: int = 4, min_caption_tokens: int = 4,
                 samples_per_epoch: int = 1_000_000):
        if context_length < 2:
            raise ValueError(f"context_length must hold SOT and EOT (got {context_length})")
        self.batch_size, self.image_size, self.context_length = batch_size, image_size, context_length
        self.device = torch.device(device)
        self.samples_per_epoch = samples_per_epoch
        self.skips = SkipCounter()
        self.batches = 0
        generator = torch.Generator().manual_seed(seed)  # drawn on the host once: the global RNG stays untouched
        self._batches = [self._draw(generator, index, min(max(min_caption_tokens, 2), context_length))
                         for index in range(distinct_batches)]

    def _draw(self, generator: torch.Generator, index: int, min_tokens: int) -> Batch:
        B, C, S = self.batch_size, self.context_length, self.image_size
        images_BCHW = torch.randn(B, 3, S, S, generator=generator)
        lengths_B = torch.randint(min_tokens, C + 1, (B,), generator=generator)
        words_BC = torch.randint(1, SOT_TOKEN_ID, (B, C), generator=generator)
        position_C = torch.arange(C)
        tokens_BC = torch.where(position_C < lengths_B[:, None], words_BC, 0)
        tokens_BC[:, 0] = SOT_TOKEN_ID
        tokens_BC[torch.arange(B), lengths_B - 1] = EOT_TOKEN_ID
        keys = [f"synthetic-{index}-{i}" for i in range(B)]
        return Batch(images=images_BCHW.to(self.device), tokens=tokens_BC.to(self.device),
                     text_lengths=lengths_B.tolist(), keys=keys, epochs=[0] * B)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batch = self._batches[self.batches % len(self._batches)]
            self.batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {"format": "megapgs-synthetic/1", "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state.get("batches", 0))


def build_synthetic_loader(*, batch_size: int, image_size: int, context_length: int,
                           device: torch.device | str, seed: int = 0) -> SyntheticLoader:
    return SyntheticLoader(batch_size=batch_size, image_size=image_size, context_length=context_length,
                           device=device, seed=seed)
