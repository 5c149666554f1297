"""GPU decoding without DALI (`data.loader: nvjpeg`): torchvision's nvJPEG binding decodes each
batch of JPEGs at once, `torchvision.io.decode_jpeg(list_of_uint8, device="cuda")`; the crop,
resize and normalisation run as torch ops on the same device.

    indexed shards ─► host thread: this rank's shards of the epoch, through a shuffle buffer,
                      encoded bytes + captions, a batch ahead
                   ─► decode_batch: JPEGs in one nvJPEG call, PNG/WebP on the CPU
                   ─► crop + bicubic resize (antialiased, PIL's kernel) ─► normalise

With `device="cpu"` the same code decodes with libjpeg-turbo: the CPU twin the tests run.
Samples are read through the checked shard indexes of `shard_index` (bad shards, captions and image
bytes never get here); each rank reads its own shards (`wds.rank_epoch_shards`); an image that
still fails makes its batch fall back to one decode per image, and the culprit is skipped and counted.
"""
from __future__ import annotations

import queue
import random
import threading
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from megapgs.config import DataConfig
from megapgs.data.faults import DataError, SkipCounter, check_caption
from megapgs.data.shard_index import IndexedShard, deep_check_image, read_index
from megapgs.data.transforms import crop_params, derive_seed
from megapgs.data.wds import Batch, rank_epoch_shards

Tokenizer = Callable[[list[str]], tuple[torch.Tensor, list[int]]]
HostSample = tuple[str, bytes, str]   # key, encoded image, caption


# ----------------------------------------------------------------------------- decoding

def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def decode_batch(encoded: Sequence[bytes], device: torch.device) -> tuple[list[torch.Tensor | None], list[str | None]]:
    """Encoded images -> ((3, H, W) uint8 on `device` or None, skip reason or None) per image.

    The JPEGs go to one batched decode_jpeg call; should it fail, each JPEG is decoded alone so
    that one bad image costs only itself. Other formats decode on the CPU."""
    images: list[torch.Tensor | None] = [None] * len(encoded)
    reasons: list[str | None] = [None] * len(encoded)
    as_tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
    jpegs = [i for i, data in enumerate(encoded) if is_jpeg(data)]
    try:
        decoded = decode_jpeg([as_tensors[i] for i in jpegs], mode=ImageReadMode.RGB, device=device) if jpegs else []
        for i, image in zip(jpegs, decoded):
            images[i] = image
    except RuntimeError:
        for i in jpegs:
            images[i], reasons[i] = _decode_one(as_tensors[i], encoded[i], device, jpeg=True)
    for i in set(range(len(encoded))) - set(jpegs):
        images[i], reasons[i] = _decode_one(as_tensors[i], encoded[i], device, jpeg=False)
    return images, reasons


def _decode_one(data_N: torch.Tensor, data: bytes, device: torch.device,
                jpeg: bool) -> tuple[torch.Tensor | None, str | None]:
    try:
        if jpeg:
            return decode_jpeg(data_N, mode=ImageReadMode.RGB, device=device), None
        return decode_image(data_N, mode=ImageReadMode.RGB).to(device), None
    except RuntimeError:
        return None, deep_check_image(data) or "image_undecodable"


# ----------------------------------------------------------------------------- geometry

def _resize(image_3HW: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic with antialiasing (torch's port of PIL's resampler), rounded to whole levels as
    PIL's uint8 output is: (3, height, width) float 0..255."""
    resized = F.interpolate(image_3HW[None].float(), size=(height, width), mode="bicubic",
                            antialias=True, align_corners=False)[0]
    return resized.round_().clamp_(0, 255)


def resize_centre_crop(image_3HW: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's Resize(size) + CenterCrop(size) (OpenCLIP's eval transform): (3, S, S) 0..255."""
    height, width = image_3HW.shape[1:]
    if width <= height:
        new_height, new_width = int(size * height / width), size
    else:
        new_height, new_width = size, int(size * width / height)
    resized = _resize(image_3HW, new_height, new_width)
    top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
    return resized[:, top:top + size, left:left + size]


def random_resized_crop(image_3HW: torch.Tensor, size: int, scale: tuple[float, float],
                        rng: random.Random) -> torch.Tensor:
    """OpenCLIP's train crop (the window drawn as in megapgs.data.transforms): (3, S, S) 0..255."""
    height, width = image_3HW.shape[1:]
    top, left, crop_h, crop_w = crop_params(width, height, scale, rng)
    return _resize(image_3HW[:, top:top + crop_h, left:left + crop_w], size, size)


def normalize(images_B3SS: torch.Tensor) -> torch.Tensor:
    """0..255 pixels -> CLIP-normalised float32."""
    mean = torch.tensor(OPENAI_DATASET_MEAN, device=images_B3SS.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(OPENAI_DATASET_STD, device=images_B3SS.device).view(1, 3, 1, 1) * 255
    return (images_B3SS - mean) / std


# ----------------------------------------------------------------------------- reading

def rank_samples(shards: Sequence[IndexedShard], skips: SkipCounter, rng: random.Random,
                 shuffle_buffer: int) -> Iterator[HostSample]:
    """The samples of `shards` (this rank's, in reading order) through a shuffle buffer. Each shard's
    index-time skips are counted when it is read; a shard changed since it was indexed is skipped."""
    buffer: list[HostSample] = []
    for shard in shards:
        skips.merge(shard.skips)
        reason = shard.changed()
        if reason:
            skips.add(reason, where=shard.path)
            continue
        if shard.index is None:
            continue
        with open(shard.path, "rb") as fh:
            for sample in read_index(shard.index):
                fh.seek(sample.image[1])
                image = fh.read(sample.image[2])
                fh.seek(sample.caption[1])
                caption, _ = check_caption(fh.read(sample.caption[2]))  # checked: never None
                buffer.append((sample.key, image, caption or ""))
                if len(buffer) > shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)) if shuffle_buffer else 0)
    rng.shuffle(buffer)
    yield from buffer


def _read_ahead(items: Iterator, depth: int = 2) -> Iterator:
    """Iterate `items` in a host thread, `depth` items ahead (file reads overlap GPU work)."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for item in items:
                ready.put(item)
            ready.put(done)
        except BaseException as err:  # handed to the consumer
            ready.put(err)

    threading.Thread(target=produce, daemon=True).start()
    while (item := ready.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


class NvjpegLoader:
    """Iterating it runs one epoch of this rank: `Batch`es of `batch_size` (the last one smaller)."""

    def __init__(self, shards: Sequence[IndexedShard], *, device: torch.device, image_size: int, augment: bool,
                 crop_scale: tuple[float, float], tokenizer: Tokenizer, batch_size: int, rank: int,
                 world_size: int, seed: int, shuffle_buffer: int):
        self.shards, self.device, self.image_size = tuple(shards), device, image_size
        self.augment, self.crop_scale, self.tokenizer = augment, crop_scale, tokenizer
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.shuffle_buffer = shuffle_buffer
        self.skips = SkipCounter()
        self.epoch = 0
        self.samples_per_epoch = sum(shard.samples for shard in shards) // world_size

    def __iter__(self) -> Iterator[Batch]:
        shuffle_rng = random.Random(derive_seed(self.seed, self.rank, self.epoch, "nvjpeg shuffle"))
        crop_rng = random.Random(derive_seed(self.seed, self.rank, self.epoch, "nvjpeg crops"))
        delivered = 0
        mine = [self.shards[i] for i in rank_epoch_shards(len(self.shards), self.rank, self.world_size, self.seed,
                                                           self.epoch)]
        for samples, skips in _read_ahead(self._host_batches(mine, shuffle_rng)):  # reads and shuffle: that thread
            self.skips.merge(skips)
            if not samples:
                continue
            images, reasons = decode_batch([image for _, image, _ in samples], self.device)
            kept = [i for i, reason in enumerate(reasons) if reason is None]
            for i, reason in enumerate(reasons):
                if reason:
                    self.skips.add(reason, where=samples[i][0], detail="found by the decoder")
            if not kept:
                continue
            pixels_B3SS = torch.stack([self._transform(images[i], crop_rng) for i in kept])
            tokens, lengths = self.tokenizer([samples[i][2] for i in kept])
            delivered += len(kept)
            yield Batch(images=normalize(pixels_B3SS), tokens=tokens, text_lengths=lengths,
                        keys=[samples[i][0] for i in kept], epochs=[self.epoch] * len(kept))
        if not delivered:
            raise DataError(f"rank {self.rank}: an epoch gave no decodable image; the data looks unreadable "
                            f"({self.skips.summary()})")
        self.epoch += 1

    def _host_batches(self, shards: list[IndexedShard], rng: random.Random
                      ) -> Iterator[tuple[list[HostSample], dict[str, int]]]:
        """(batch, skips met since the previous batch), read in the host thread: the thread's skips
        reach the loader's counter with the batches, on the training thread."""
        skips = SkipCounter()
        batch: list[HostSample] = []
        for sample in rank_samples(shards, skips, rng, self.shuffle_buffer):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield batch, skips.take()
                batch = []
        yield batch, skips.take()

    def _transform(self, image_3HW: torch.Tensor, rng: random.Random) -> torch.Tensor:
        if self.augment:
            return random_resized_crop(image_3HW, self.image_size, self.crop_scale, rng)
        return resize_centre_crop(image_3HW, self.image_size)


def build_nvjpeg_loader(cfg: DataConfig, shards: Sequence[IndexedShard], *, image_size: int, tokenizer: Tokenizer,
                        batch_size: int, rank: int, world_size: int, seed: int,
                        device: str | torch.device) -> NvjpegLoader:
    """The nvJPEG loader of this rank over the shards of a manifest (`shard_index`)."""
    if cfg.resampled:
        raise DataError("data.resampled is not supported by data.loader 'nvjpeg'; use 'dali' or 'wds'")
    if not shards or not any(s.samples for s in shards):
        raise DataError(f"no readable sample in the {len(shards)} indexed shards; check data.train_shards")
    if len(shards) < world_size:
        raise DataError(f"data.train_shards: {len(shards)} shards cannot feed {world_size} ranks (each rank reads "
                        "its own shards); write smaller shards")
    return NvjpegLoader(shards, device=torch.device(device), image_size=image_size, augment=cfg.augment,
                        crop_scale=tuple(cfg.crop_scale), tokenizer=tokenizer, batch_size=batch_size, rank=rank,
                        world_size=world_size, seed=seed, shuffle_buffer=cfg.shuffle_buffer)
