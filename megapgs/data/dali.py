"""The DALI loader: webdataset shards -> decoded, cropped, normalised images on the GPU.

Two DALI pipelines, joined on the host:

    manifest ─► reader (CPU, `dali_stream`): fn.readers.webdataset over a window of this rank's
                shards → encoded images, captions, keys; captions tokenised in the reader's thread
             ─► decoder (device "mixed" or "cpu"): fn.external_source, fed the reader's own
                TensorList → decode (RGB) → random resized crop | resize shorter side + centre crop
                → crop_mirror_normalize (CLIP mean/std) → (B, 3, S, S) float32

The decoder pipeline is one definition (`decode_and_transform`) run either on the GPU
(`device="mixed"`: nvJPEG/nvImageCodec, CUDA output) or in DALI's CPU-only mode
(`device="cpu"`, `device_id=None`), which is what the tests exercise.

Bad input: the reader only reads what `shard_index` kept when the shards were indexed (missing,
empty and cut tars and bad captions/images never reach DALI); a shard that changed since is skipped
and counted when its window opens. DALI fails a whole batch, and then the whole pipeline, on an
image it cannot decode; the host knows which samples that batch held, decodes them with PIL to find
the culprits, counts them, rebuilds the decoder and feeds the same samples again without them. A
rank whose data keeps failing stops with `DataError` after `MAX_FAILED_BATCHES` failures in a row.

The stream is endless (epoch after epoch, every batch full) and resumes exactly: `state_dict()` is
the position after the last delivered batch (`dali_stream.Position`).
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from megapgs.config import DataConfig
from megapgs.data.dali_stream import Position, ReaderBatch, ReaderThread, StreamSpec, stream_batches
from megapgs.data.faults import DataError, SkipCounter, skips_of_old_ranks
from megapgs.data.shard_index import IndexedShard, deep_check_image
from megapgs.data.wds import Batch, warn_split_anew

log = logging.getLogger(__name__)
STATE_FORMAT = "megapgs-dali-loader/1"


MAX_FAILED_BATCHES = 8             # decoder failures in a row before the data counts as unreadable
RATIO_RANGE = (3 / 4, 4 / 3)       # torchvision RandomResizedCrop's aspect ratios (OpenCLIP's train)
# DALI names the failing operator in its error; only these fail because of an image's bytes
DECODING_OPERATORS = ("fn.decoders.", "fn.peek_image_shape")
Tokenizer = Callable[[list[str]], tuple[torch.Tensor, list[int]]]


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




# ----------------------------------------------------------------------------- the loader

@dataclass
class _Sample:
    """One sample outside a whole reader batch (a window's edge, a retry after a bad image)."""
    image: np.ndarray                 # (n_bytes,) uint8: the encoded image as stored
    key: str
    tokens: torch.Tensor              # (C,) int64
    length: int
    epoch: int
    after: Position                   # the stream's position once this sample is delivered
    skips_before: dict[str, int] = field(default_factory=dict)  # skips met just before it in the stream


@dataclass
class _FedBatch:
    """A batch handed to the decoder, waiting for its decoded images."""
    images: object                    # the reader's TensorList (whole reader batch) or a list of arrays
    keys: list[str]
    tokens: torch.Tensor
    lengths: list[int]
    epochs: list[int]
    after: Position
    skips: SkipCounter
    samples: list[_Sample] | None = None  # the slow path's samples (None: a whole reader batch)

    def as_samples(self) -> list[_Sample]:
        """Its samples one by one (to feed again after a decoder failure)."""
        if self.samples is not None:
            return self.samples
        last = len(self.keys) - 1
        return [_Sample(np.array(self.images[i]), key, self.tokens[i], self.lengths[i], self.epochs[i],
                        self.after if i == last else Position(self.after.epoch, self.after.window, self.after.batch,
                                                              self.after.checkpoint, i + 1),
                        self.skips.counts if i == 0 else {})
                for i, key in enumerate(self.keys)]


class _Assembler:
    """Full batches of `batch_size` from the reader's batches. A whole reader batch of good samples
    goes to the decoder as it is (DALI's TensorList: no per-sample work); samples around a window's
    edge, next to a dropped one, or fed again after a decoder failure go one by one."""

    def __init__(self, reader: Iterator[ReaderBatch], batch_size: int, bad_keys: dict[str, str], start: Position,
                 samples_per_epoch: int):
        self.reader, self.batch_size, self.bad_keys = reader, batch_size, bad_keys
        self.pending: deque[_Sample] = deque()
        self.carry = SkipCounter()            # skips not yet attached to a sample
        self.resume = start if start.inside_window else None  # drop what was delivered before a resume
        # every sample known bad for twice an epoch in a row: the data is unreadable, stop (not spin)
        self.bad_in_a_row, self.bad_limit = 0, 2 * max(samples_per_epoch, batch_size)

    def next_batch(self) -> _FedBatch:
        while len(self.pending) < self.batch_size:
            batch = next(self.reader)
            first = self._already_delivered(batch)
            self.carry.merge(batch.skips)
            if not self.pending and first == 0 and self._whole(batch):
                fed = _FedBatch(batch.images, batch.keys, batch.tokens, batch.lengths, [batch.epoch] * len(batch.keys),
                                Position(batch.epoch, batch.window, batch.batch, batch.checkpoint, len(batch.keys)),
                                self.carry)
                self.carry = SkipCounter()
                return fed
            self._split(batch, first)
        samples = [self.pending.popleft() for _ in range(self.batch_size)]
        return self.batch_of(samples)

    def batch_of(self, samples: list[_Sample]) -> _FedBatch:
        skips = SkipCounter()
        for sample in samples:
            skips.merge(sample.skips_before)
        return _FedBatch([s.image for s in samples], [s.key for s in samples], torch.stack([s.tokens for s in samples]),
                         [s.length for s in samples], [s.epoch for s in samples], samples[-1].after, skips, samples)

    def feed_again(self, samples: list[_Sample], trailing: SkipCounter) -> None:
        """Samples of failed batches (the bad ones dropped), ahead of everything pending; `trailing`:
        the skips after the last of them, which go with the sample that follows it."""
        if self.pending:
            merged = SkipCounter(self.pending[0].skips_before)
            merged.merge(trailing)
            self.pending[0].skips_before = merged.counts
        else:
            self.carry.merge(trailing)
        self.pending.extendleft(reversed(samples))

    def _already_delivered(self, batch: ReaderBatch) -> int:
        if self.resume is not None and (batch.epoch, batch.window, batch.batch) == (
                self.resume.epoch, self.resume.window, self.resume.batch):
            first, self.resume = self.resume.offset, None
            return first
        return 0

    def _whole(self, batch: ReaderBatch) -> bool:
        return (len(batch.keys) == self.batch_size and all(batch.valid)
                and not any(key in self.bad_keys for key in batch.keys))

    def _split(self, batch: ReaderBatch, first: int) -> None:
        for i in range(first, len(batch.keys)):
            after = Position(batch.epoch, batch.window, batch.batch, batch.checkpoint, i + 1)
            key = batch.keys[i]
            if not batch.valid[i]:
                continue  # padding past the window's end (a caption found bad was counted by the reader)
            if key in self.bad_keys:  # found by the decoder in an earlier pass: skipped, counted again
                self.carry.add(self.bad_keys[key], where=key)
                self.bad_in_a_row += 1
                if self.bad_in_a_row > self.bad_limit:
                    raise DataError(f"{self.bad_in_a_row} samples in a row are images the decoder cannot decode; "
                                    f"the data looks unreadable ({self.carry.summary()})")
                continue
            self.bad_in_a_row = 0
            self.pending.append(_Sample(np.array(batch.images[i]), key, batch.tokens[i], batch.lengths[i],
                                        batch.epoch, after, self.carry.counts))
            self.carry = SkipCounter()


class DaliLoader:
    """Endless full `Batch`es of one rank (epoch after epoch); `state_dict()` is where it stands."""

    def __init__(self, spec: StreamSpec, *, device: str, image_size: int, augment: bool,
                 crop_scale: tuple[float, float], tokenizer: Tokenizer, samples_per_epoch: int):
        self.spec, self.device, self.tokenizer = spec, device, tokenizer
        self.batch_size, self.rank, self.seed, self.threads = spec.batch_size, spec.rank, spec.seed, spec.threads
        self.transform = dict(device=device, image_size=image_size, augment=augment, crop_scale=crop_scale)
        self.samples_per_epoch = samples_per_epoch
        self.skips = SkipCounter()            # of the delivered batches
        self.position = Position()
        self.bad_keys: dict[str, str] = {}    # found at run time -> reason; skipped from then on
        self._decoder_builds = 0

    def probe(self) -> None:
        """Build the decoder once: a DALI that cannot start here (library, driver) fails now, not at step 1."""
        pipe = self._build_decoder(lambda: [np.zeros(1, dtype=np.uint8)], batch_size=1)
        del pipe

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, **self.spec.fingerprint(), "position": self.position.to_state(),
                "skips": dict(self.skips.counts), "bad_keys": dict(self.bad_keys)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a DALI loader state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        self.skips = SkipCounter(state["skips"])
        self.bad_keys = dict(state.get("bad_keys", {}))
        position = Position.from_state(state["position"])
        changed = {k: (state.get(k), v) for k, v in self.spec.fingerprint().items() if state.get(k) != v}
        if changed:
            position = Position(epoch=position.epoch + 1)
            log.warning("data: the DALI loader's state was saved with %s; resuming at the start of epoch %d "
                        "instead of the exact place", ", ".join(f"{k}={a} (now {b})" for k, (a, b) in changed.items()),
                        position.epoch)
        else:
            log.info("data: DALI resumes at epoch %d, window %d, reader batch %d, sample %d of it (exact: the "
                     "samples the uninterrupted run would have read next)", position.epoch, position.window,
                     position.batch, position.offset)
        self.position = position

    def load_other_world_states(self, states: list[dict], samples_seen: int) -> None:
        """Resume from a run on len(states) ranks (megapgs/train/reshard.py): the shards are split
        anew, so this rank starts the epoch after the newest any old rank was in."""
        for state in states:
            if state.get("format") != STATE_FORMAT:
                raise ValueError(f"not a DALI loader state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        epoch = max(Position.from_state(state["position"]).epoch for state in states) + 1
        self.skips = skips_of_old_ranks([state["skips"] for state in states], self.rank, self.spec.world_size)
        self.bad_keys = {key: why for state in states for key, why in state.get("bad_keys", {}).items()}
        self.position = Position(epoch=epoch)
        warn_split_anew(len(states), self.spec.world_size, epoch, samples_seen)

    def __iter__(self) -> Iterator[Batch]:
        start = self.position
        reader = ReaderThread(lambda stop: stream_batches(self.spec, self.tokenizer, start, stop))
        try:
            assembler = _Assembler(iter(reader), self.batch_size, self.bad_keys, start, self.samples_per_epoch)
            for fed, images in self._decode(assembler):
                self.skips.merge(fed.skips)
                self.position = fed.after
                yield Batch(images=images, tokens=fed.tokens, text_lengths=fed.lengths, keys=fed.keys,
                            epochs=fed.epochs)
        finally:
            reader.close()

    def _decode(self, assembler: _Assembler) -> Iterator[tuple[_FedBatch, torch.Tensor]]:
        """(fed batch, images (B, 3, S, S)) in order. A decoder failure feeds the batches still in the
        pipeline again, less the images found bad."""
        in_flight: deque[_FedBatch] = deque()  # handed to DALI, not yet returned
        source_errors: list[BaseException] = []  # raised inside DALI's call of `source`: the reader's

        def source():
            try:
                fed = assembler.next_batch()
            except BaseException as err:
                source_errors.append(err)
                raise
            in_flight.append(fed)
            return fed.images

        failures = 0
        while True:
            pipe = self._build_decoder(source)
            try:
                while True:
                    (images,) = pipe.run()
                    failures = 0
                    yield in_flight.popleft(), self._to_torch(images)
            except Exception as err:  # DALI's pipeline is dead after an error: find the culprits
                if source_errors:
                    raise source_errors[0] from None  # the reader's own error, as it raised it
                if not isinstance(err, RuntimeError) or not any(op in str(err) for op in DECODING_OPERATORS):
                    raise  # not the data: a fault of the pipeline or the device
                failures += 1
                if failures > MAX_FAILED_BATCHES:
                    raise DataError(f"the DALI decoder failed on {failures} batches in a row; the data looks "
                                    f"unreadable ({self.skips.summary()}). Last error: {err}") from None
                assembler.feed_again(*self._drop_bad_images([s for fed in in_flight for s in fed.as_samples()], err))
                in_flight.clear()
            finally:
                del pipe

    def _drop_bad_images(self, samples: list[_Sample], err: Exception) -> tuple[list[_Sample], SkipCounter]:
        """`samples` without the images that fail to decode, which are counted: each skip goes with the
        next good sample, and those after the last one are returned."""
        reasons = {s.key: deep_check_image(s.image.tobytes()) for s in samples}
        if not any(reasons.values()):  # PIL decodes them all: ask this device's decoder, one by one
            reasons = {s.key: None if self._decodes_alone(s) else "image_undecodable" for s in samples}
        if not any(reasons.values()):
            raise DataError(f"the DALI {self.device} decoder failed on a batch whose every image decodes "
                            f"alone; not a data fault: {err}")
        kept, carry = [], SkipCounter()
        for sample in samples:
            carry.merge(sample.skips_before)
            reason = reasons[sample.key]
            if reason:
                self.bad_keys[sample.key] = reason
                carry.add(reason, where=sample.key, detail="found by the decoder")
                continue
            sample.skips_before, carry = carry.counts, SkipCounter()
            kept.append(sample)
        return kept, carry

    def _decodes_alone(self, sample: _Sample) -> bool:
        pipe = self._build_decoder(lambda: [sample.image], batch_size=1)
        try:
            pipe.run()
            return True
        except RuntimeError:
            return False
        finally:
            del pipe

    def _build_decoder(self, source: Callable[[], object], batch_size: int | None = None):
        """A fresh decoder pipeline (a new seed each build, so a rebuild does not replay crops)."""
        self._decoder_builds += 1
        device_id = torch.cuda.current_device() if self.device == "mixed" else None
        pipe = _decoder_pipeline(
            source=source, batch_size=batch_size or self.batch_size, num_threads=self.threads,
            device_id=device_id, seed=(self.seed + 7919 * self.rank + 104729 * self._decoder_builds) % 2**31,
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


def build_dali_loader(cfg: DataConfig, shards: Sequence[IndexedShard], *, image_size: int, tokenizer: Tokenizer,
                      batch_size: int, rank: int, world_size: int, seed: int,
                      device: str | torch.device) -> DaliLoader:
    """The DALI loader of this rank over the shards of a manifest (`shard_index`): nothing is read or
    checked here; each window's shards are stat'ed when the window opens."""
    remote = [s.path for s in shards if "://" in s.path or s.path.startswith("pipe:")]
    if remote:
        raise DataError(f"the dali loader reads local shard files only (got {remote[0]}); use data.loader 'wds' "
                        "for remote shards")
    if not shards or not any(s.samples for s in shards):
        raise DataError(f"no readable sample in the {len(shards)} indexed shards; check data.train_shards")
    if len(shards) < world_size and not cfg.resampled:
        raise DataError(f"data.train_shards: {len(shards)} shards cannot feed {world_size} ranks (each rank reads "
                        "its own shards); write smaller shards or set data.resampled: true")
    spec = StreamSpec(tuple(shards), rank, world_size, seed, cfg.resampled, cfg.dali_window_shards,
                      cfg.shuffle_buffer, batch_size, max(1, cfg.workers))
    return DaliLoader(spec, device=dali_device(device), image_size=image_size, augment=cfg.augment,
                      crop_scale=tuple(cfg.crop_scale), tokenizer=tokenizer,
                      samples_per_epoch=sum(s.samples for s in shards) // world_size)
