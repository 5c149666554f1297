"""The DALI loader: webdataset shards -> decoded, cropped, normalised images on the GPU.

Two DALI pipelines, joined on the host:

    checked shards ─► reader (CPU): fn.readers.webdataset → encoded image, caption bytes, key
                   ─► host: captions → tokenizer; samples packed into batches of batch_size
                   ─► decoder (device "mixed" or "cpu"): fn.external_source → decode (RGB)
                      → random resized crop | resize shorter side + centre crop
                      → crop_mirror_normalize (CLIP mean/std) → (B, 3, S, S) float32

The decoder pipeline is one definition (`decode_and_transform`) run either on the GPU
(`device="mixed"`: nvJPEG/nvImageCodec, CUDA output) or in DALI's CPU-only mode
(`device="cpu"`, `device_id=None`), which is what the tests exercise.

Bad input: the reader only sees samples that `dali_checks.check_shard` kept (missing, empty and
cut tars and bad captions/images never reach DALI). DALI fails a whole batch, and then the
whole pipeline, on an image it cannot decode; the host knows which samples that batch held (the
split into two pipelines exists for this), so it decodes them with PIL to find the culprits,
counts them, rebuilds the decoder and feeds the same samples again without them. A rank whose
data keeps failing stops with `DataError` after `MAX_FAILED_BATCHES` failures in a row.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from megapgs.config import DataConfig
from megapgs.data.dali_checks import IMAGE_EXTS, CheckedShard, check_readable_shards, deep_check_image
from megapgs.data.faults import SkipCounter, check_caption
from megapgs.data.prepare import DataError
from megapgs.data.wds import Batch


MAX_FAILED_BATCHES = 8             # decoder failures in a row before the data counts as unreadable
RATIO_RANGE = (3 / 4, 4 / 3)       # torchvision RandomResizedCrop's aspect ratios (OpenCLIP's train)
# DALI names the failing operator in its error; only these fail because of an image's bytes
DECODING_OPERATORS = ("fn.decoders.", "fn.peek_image_shape")
Tokenizer = Callable[[list[str]], tuple[torch.Tensor, list[int]]]


@dataclass(frozen=True)
class EncodedSample:
    key: str
    image: np.ndarray       # (n_bytes,) uint8: the encoded image as stored
    caption: str


# ----------------------------------------------------------------------------- pipeline definitions

def decode_and_transform(encoded, *, device: str, image_size: int, augment: bool,
                         crop_scale: tuple[float, float]):
    """encoded images (CPU uint8) -> (3, S, S) float32 normalised with CLIP's mean/std.

    augment: OpenCLIP's train transform (RandomResizedCrop(S, scale, ratio 3/4..4/3, bicubic)),
    with the crop window fused into the decoder so that only the window is decoded.
    Otherwise OpenCLIP's eval transform, geometry exactly as torchvision computes it: resize the
    shorter side to S (longer: floor(S * long / short)), bicubic, then a centre crop whose corner
    is round-half-to-even((size - S) / 2).
    """
    decoder = "mixed" if device == "mixed" else "cpu"
    size = image_size
    if augment:
        images = fn.decoders.image_random_crop(
            encoded, device=decoder, output_type=types.RGB, random_area=list(crop_scale),
            random_aspect_ratio=list(RATIO_RANGE), num_attempts=10)
        images = fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
    else:
        shape = fn.peek_image_shape(encoded, dtype=types.INT64)            # (H, W, C)
        height, width = shape[0], shape[1]
        width_is_short = fn.cast(width <= height, dtype=types.INT64)       # 1 or 0
        new_height = width_is_short * ((size * height) // width) + (1 - width_is_short) * size
        new_width = width_is_short * size + (1 - width_is_short) * ((size * width) // height)
        images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
        images = fn.resize(images, resize_y=fn.cast(new_height, dtype=types.FLOAT),
                           resize_x=fn.cast(new_width, dtype=types.FLOAT),
                           interp_type=types.INTERP_CUBIC, antialias=True)
        top, left = _centre_offset(new_height - size), _centre_offset(new_width - size)
        images = fn.slice(images, start=fn.cat(top, left), shape=[size, size], axes=[0, 1])
    return fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW",
        mean=[255 * m for m in OPENAI_DATASET_MEAN], std=[255 * s for s in OPENAI_DATASET_STD])


def _centre_offset(excess):
    """round(excess / 2) with Python's round-half-to-even (torchvision's CenterCrop), as a
    (1,) int64 node: an odd excess 2k+1 goes to k when k is even, to k+1 when k is odd."""
    half = excess // 2
    offset = half + ((excess & 1) & (half & 1))
    return fn.reshape(fn.cast(offset, dtype=types.INT32), shape=[1])


@pipeline_def(enable_conditionals=False)
def _decoder_pipeline(source, device, image_size, augment, crop_scale):
    encoded = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1, no_copy=False)
    return decode_and_transform(encoded, device=device, image_size=image_size, augment=augment,
                                crop_scale=crop_scale)


@pipeline_def
def _reader_pipeline(paths, index_paths, shard_id, num_shards, shuffle_buffer, pad_last_batch):
    images, captions = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=[";".join(IMAGE_EXTS), "txt"],
        missing_component_behavior="error", shard_id=shard_id, num_shards=num_shards,
        random_shuffle=shuffle_buffer > 0, initial_fill=max(shuffle_buffer, 1),
        pad_last_batch=pad_last_batch, stick_to_shard=True, name="reader")
    return images, captions, fn.get_property(images, key="source_info")    # "tar:offset:member"


# ----------------------------------------------------------------------------- the loader

class DaliLoader:
    """Iterating it runs one epoch of this rank: `Batch`es of `batch_size` (the last one smaller)."""

    def __init__(self, checked: list[CheckedShard], *, device: str, image_size: int, augment: bool,
                 crop_scale: tuple[float, float], tokenizer: Tokenizer, batch_size: int, rank: int,
                 world_size: int, seed: int, shuffle_buffer: int, resampled: bool, threads: int):
        self.device, self.tokenizer, self.batch_size = device, tokenizer, batch_size
        self.rank, self.world_size, self.seed, self.threads = rank, world_size, seed, threads
        self.transform = dict(device=device, image_size=image_size, augment=augment, crop_scale=crop_scale)
        self.checked = checked
        self.skips = SkipCounter()
        self.epoch = 0
        self._bad_keys: dict[str, str] = {}          # found at run time -> reason; skipped from then on
        self._decoder_builds = 0
        readable = [shard for shard in checked if shard.samples]
        total = sum(shard.samples for shard in readable)
        if resampled:  # every rank reads every shard, in its own order, without an epoch boundary
            order = np.random.default_rng([seed, rank]).permutation(len(readable))
            readable = [readable[i] for i in order]
            shard_id, num_shards, self.samples_per_epoch = 0, 1, total // world_size
        else:  # DALI gives rank r the samples [floor(N r / W), floor(N (r+1) / W)) of the list
            shard_id, num_shards = rank, world_size
            self.samples_per_epoch = total * (rank + 1) // world_size - total * rank // world_size
        if self.samples_per_epoch == 0:
            raise DataError(f"rank {rank} of {world_size} has no sample to read: {total} readable samples "
                            f"in {len(readable)} of {len(checked)} shards")
        self._reader = _reader_pipeline(
            paths=[str(s.path) for s in readable], index_paths=[str(s.index_path) for s in readable],
            shard_id=shard_id, num_shards=num_shards, shuffle_buffer=shuffle_buffer,
            pad_last_batch=not resampled, batch_size=batch_size, num_threads=threads, device_id=None,
            seed=seed + rank, prefetch_queue_depth=2)
        self._reader.build()

    def __len__(self) -> int:
        return -(-self.samples_per_epoch // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        self._count_checked_skips()
        delivered = 0
        for taken, images in self._decode(self._epoch_samples()):
            tokens, lengths = self.tokenizer([s.caption for s in taken])
            delivered += len(taken)
            yield Batch(images=images, tokens=tokens, text_lengths=lengths, keys=[s.key for s in taken],
                        epochs=[self.epoch] * len(taken))
        if not delivered:
            raise DataError(f"rank {self.rank}: an epoch of {self.samples_per_epoch} samples gave no decodable "
                            f"image; the data looks unreadable ({self.skips.summary()})")
        self.epoch += 1

    def _count_checked_skips(self) -> None:
        """The skips found by the shard checks, once per epoch; shard i is counted by rank i % W,
        so that the counts summed over ranks are the data set's."""
        for i, shard in enumerate(self.checked):
            if i % self.world_size == self.rank:
                for reason, count in shard.skips.items():
                    for _ in range(count):
                        self.skips.add(reason, where=str(shard.path))

    def _epoch_samples(self) -> Iterator[EncodedSample]:
        """This rank's samples for one epoch, read ahead by the reader pipeline."""
        remaining = self.samples_per_epoch
        while remaining > 0:
            try:
                images, captions, sources = self._reader.run()
            except RuntimeError as err:  # a shard changed or vanished since it was checked
                raise DataError(f"DALI's webdataset reader failed: {err}") from None
            for i in range(min(len(images), remaining)):  # past `remaining`: padding of the last batch
                member = bytes(np.array(sources[i])).decode().rsplit(":", 2)[-1]
                key = member[:member.find(".", member.rfind("/") + 1)]
                if key in self._bad_keys:
                    self.skips.add(self._bad_keys[key], where=key)
                    continue
                caption, _ = check_caption(bytes(np.array(captions[i])))  # checked: never None
                yield EncodedSample(key, np.array(images[i]), caption or "")
            remaining -= len(images)

    def _decode(self, samples: Iterator[EncodedSample]) -> Iterator[tuple[list[EncodedSample], torch.Tensor]]:
        """(samples, images (B, 3, S, S)) per batch. Samples go to the decoder through `source`;
        a failure re-queues the batches still in the pipeline, less the images found bad."""
        waiting: deque[EncodedSample] = deque()       # re-queued samples, fed before new ones
        in_flight: deque[list[EncodedSample]] = deque()  # batches handed to DALI, not yet returned

        def source() -> list[np.ndarray]:
            batch = [waiting.popleft() for _ in range(min(len(waiting), self.batch_size))]
            batch += [s for _, s in zip(range(self.batch_size - len(batch)), samples)]
            if not batch:
                raise StopIteration
            in_flight.append(batch)
            return [s.image for s in batch]

        failures = 0
        while True:
            pipe = self._build_decoder(source)
            try:
                while True:
                    try:
                        (images,) = pipe.run()
                    except StopIteration:
                        return
                    failures = 0
                    yield in_flight.popleft(), self._to_torch(images)
            except RuntimeError as err:  # DALI's pipeline is dead after an error: find the culprits
                if not any(op in str(err) for op in DECODING_OPERATORS):
                    raise  # not the data: a fault of the pipeline or the device
                failures += 1
                if failures > MAX_FAILED_BATCHES:
                    raise DataError(f"the DALI decoder failed on {failures} batches in a row; the data looks "
                                    f"unreadable ({self.skips.summary()}). Last error: {err}") from None
                retry = self._drop_bad_images(list(in_flight), err)
                in_flight.clear()
                waiting.extendleft(reversed(retry))
            finally:
                del pipe

    def _drop_bad_images(self, batches: list[list[EncodedSample]], err: Exception) -> list[EncodedSample]:
        """The samples of `batches` without the images that fail to decode (counted)."""
        samples = [s for batch in batches for s in batch]
        reasons = {s.key: deep_check_image(s.image.tobytes()) for s in samples}
        if not any(reasons.values()):  # PIL decodes them all: ask this device's decoder, one by one
            reasons = {s.key: None if self._decodes_alone(s) else "image_undecodable" for s in samples}
        if not any(reasons.values()):
            raise DataError(f"the DALI {self.device} decoder failed on a batch whose every image decodes "
                            f"alone; not a data fault: {err}")
        for key, reason in reasons.items():
            if reason:
                self._bad_keys[key] = reason
                self.skips.add(reason, where=key, detail="found by the decoder")
        return [s for s in samples if not reasons[s.key]]

    def _decodes_alone(self, sample: EncodedSample) -> bool:
        pipe = self._build_decoder(lambda: [sample.image], batch_size=1)
        try:
            pipe.run()
            return True
        except RuntimeError:
            return False
        finally:
            del pipe

    def _build_decoder(self, source: Callable[[], list[np.ndarray]], batch_size: int | None = None):
        """A fresh decoder pipeline (a new seed each build, so a rebuild does not replay crops)."""
        self._decoder_builds += 1
        device_id = torch.cuda.current_device() if self.device == "mixed" else None
        pipe = _decoder_pipeline(
            source=source, batch_size=batch_size or self.batch_size, num_threads=self.threads,
            device_id=device_id, seed=self.seed + 7919 * self.rank + 104729 * self._decoder_builds,
            prefetch_queue_depth=2, **self.transform)
        pipe.build()
        return pipe

    def _to_torch(self, images) -> torch.Tensor:
        """DALI's batch -> (B, 3, S, S) float32 torch tensor (a copy: DALI reuses its buffers)."""
        if self.device != "mixed":
            return torch.from_numpy(np.array(images.as_array()))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = images.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.float32, device=torch.device("cuda", torch.cuda.current_device()))
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream())
        return out


def dali_device(device: str | torch.device) -> str:
    """"mixed" (GPU decoding) for a CUDA device or "mixed"; "cpu" (DALI's CPU-only mode) else."""
    name = device if isinstance(device, str) else device.type
    return "mixed" if name == "mixed" or name.startswith("cuda") else "cpu"


def build_dali_loader(cfg: DataConfig, shards: Sequence[str], *, image_size: int, tokenizer: Tokenizer,
                      batch_size: int, rank: int, world_size: int, seed: int,
                      device: str | torch.device) -> DaliLoader:
    """The DALI loader of this rank over `shards` (local tar files, manifest order).

    Shards are checked first (cached beside them, else under `{data.root}/dali_checked`)."""
    checked = check_readable_shards(shards, Path(cfg.root) / "dali_checked", threads=max(1, cfg.workers))
    return DaliLoader(checked, device=dali_device(device), image_size=image_size, augment=cfg.augment,
                      crop_scale=tuple(cfg.crop_scale), tokenizer=tokenizer, batch_size=batch_size,
                      rank=rank, world_size=world_size, seed=seed, shuffle_buffer=cfg.shuffle_buffer,
                      resampled=cfg.resampled, threads=max(1, cfg.workers))
