"""Random images and captions, made on the device: the model's throughput without any loading.

`SyntheticLoader` has the CPU loader's surface (endless `Batch`es, `samples_per_epoch`, `skips`,
`state_dict`), so a run or the profiler swaps it in with `data.source: synthetic`.

Sample n of the stream is a pure function of (seed, n mod distinct_samples), drawn by a
counter-based hash (`SampleKeyedDraws`): no generator state, no host work per sample. Global
micro-batch c holds samples c*W*B .. (c+1)*W*B - 1 and rank r takes its B rows of them, so a step
sees the same samples however its global batch is split over ranks and accumulation steps (the
rank- and accumulation-invariance checks). Images are N(0, 1) pixels (Box-Muller); captions are
OpenCLIP-shaped: SOT, random word ids, EOT (the highest id), zero padding. Caption lengths are
drawn on the host from the same integer hash, so packing the text needs nothing from the device.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from megapgs.data.faults import SkipCounter
from megapgs.data.wds import Batch
from megapgs.pgs.keyed_random import SampleKeyedDraws

SOT_TOKEN_ID, EOT_TOKEN_ID = 49406, 49407  # OpenCLIP's BPE: start and end of text
_IMAGE_STREAMS, _LENGTH_STREAM, _WORD_STREAM = (0, 1), 2, 3


class SyntheticLoader:
    def __init__(self, *, batch_size: int, image_size: int, context_length: int, device: torch.device | str,
                 seed: int = 0, rank: int = 0, world_size: int = 1, distinct_samples: int = 128,
                 min_caption_tokens: int = 4, samples_per_epoch: int = 1_000_000):
        if context_length < 2:
            raise ValueError(f"context_length must hold SOT and EOT (got {context_length})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        rows = batch_size * world_size
        if distinct_samples % rows:  # each rank's rows then never wrap around the cycle
            distinct_samples = math.ceil(distinct_samples / rows) * rows
        self.batch_size, self.image_size, self.context_length = batch_size, image_size, context_length
        self.rank, self.world_size, self.distinct_samples = rank, world_size, distinct_samples
        self.min_tokens = min(max(min_caption_tokens, 2), context_length)
        self.device = torch.device(device)
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch
        self.skips = SkipCounter()
        self.batches = 0  # global micro-batches delivered

    def first_sample(self, batch_index: int) -> int:
        """Index (in the cycle of distinct samples) of this rank's first row of global micro-batch c."""
        rows = self.batch_size * self.world_size
        return (batch_index * rows + self.rank * self.batch_size) % self.distinct_samples

    def draw(self, batch_index: int) -> Batch:
        B, C, S = self.batch_size, self.context_length, self.image_size
        first = self.first_sample(batch_index)
        draws = SampleKeyedDraws(self.seed, 0, first)
        u1, u2 = (draws.uniform(B, 3 * S * S, stream, self.device) for stream in _IMAGE_STREAMS)
        images_BCHW = (torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2 * math.pi * u2)).view(B, 3, S, S)
        span = C - self.min_tokens + 1
        lengths_B = draws.bits(B, 1, _LENGTH_STREAM, "cpu")[:, 0] % span + self.min_tokens    # host
        words_BC = draws.bits(B, C, _WORD_STREAM, self.device) % (SOT_TOKEN_ID - 1) + 1
        position_C = torch.arange(C, device=self.device)
        lengths_dev_B = draws.bits(B, 1, _LENGTH_STREAM, self.device)[:, 0] % span + self.min_tokens
        tokens_BC = torch.where(position_C < lengths_dev_B[:, None], words_BC, 0)
        tokens_BC[:, 0] = SOT_TOKEN_ID
        tokens_BC.scatter_(1, (lengths_dev_B - 1)[:, None], EOT_TOKEN_ID)
        keys = [f"synthetic-{first + i}" for i in range(B)]
        return Batch(images=images_BCHW, tokens=tokens_BC, text_lengths=lengths_B.tolist(), keys=keys,
                     epochs=[0] * B)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batch = self.draw(self.batches)
            self.batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {"format": "megapgs-synthetic/2", "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state.get("batches", 0))

    def load_other_world_states(self, states: list[dict], samples_seen: int) -> None:
        """Resume from a run on len(states) ranks: the stream is global, so it continues exactly at
        the next global sample, dealt over this run's ranks."""
        self.batches = samples_seen // (self.batch_size * self.world_size)


def build_synthetic_loader(*, batch_size: int, image_size: int, context_length: int, device: torch.device | str,
                           seed: int = 0, rank: int = 0, world_size: int = 1,
                           distinct_samples: int = 128) -> SyntheticLoader:
    return SyntheticLoader(batch_size=batch_size, image_size=image_size, context_length=context_length,
                           device=device, seed=seed, rank=rank, world_size=world_size,
                           distinct_samples=distinct_samples)
