"""The nvJPEG loader (torchvision's decode_jpeg): its CPU twin against the PIL loader and the planted
faults (every run), its GPU decoding against the CPU twin (where CUDA is present). Apart from the
DALI tests, so that it runs on a GPU machine without DALI."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from megapgs.data import shard_index
from megapgs.data.nvjpeg import build_nvjpeg_loader, decode_batch, is_jpeg
from megapgs.data.tokenizer import Tokenizer
from tests.data.faulty_shards import write_faulty_shards
from tests.data.loader_photos import (IMAGE_SIZE, assert_gpu_matches_the_cpu_twin, assert_matches_the_pil_loader,
                                     data_config, epoch, indexed)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer("tiny-28")


def test_nvjpeg_cpu_twin_matches_the_cpu_loader(tmp_path, tokenizer):
    assert_matches_the_pil_loader(build_nvjpeg_loader, tmp_path, tokenizer, "nvJPEG loader (CPU twin)")


@pytest.mark.parametrize("byte_checks", [True, False])
def test_nvjpeg_planted_faults_are_skipped_and_counted(tmp_path, tokenizer, monkeypatch, byte_checks):
    """Without the byte checks the bad JPEGs reach decode_jpeg: their batch falls back to one
    decode per image, and each culprit is counted with the CPU loader's reason."""
    if not byte_checks:
        monkeypatch.setattr(shard_index, "check_image", lambda data: None)
    faulty = write_faulty_shards(tmp_path / "faulty")
    loader = build_nvjpeg_loader(data_config(tmp_path, augment=True, shuffle_buffer=16),
                                 indexed(faulty.shards, tmp_path / "index"), image_size=IMAGE_SIZE, tokenizer=tokenizer,
                                 batch_size=4, rank=0, world_size=1, seed=0, device="cpu")
    keys, _ = epoch(loader)
    assert sorted(keys) == sorted(faulty.good_keys)
    assert loader.skips.nonzero() == faulty.expected_skips


def test_nvjpeg_decode_batch_isolates_a_bad_image():
    good = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 30, 40)).save(good, format="JPEG")
    png = io.BytesIO()
    Image.new("L", (7, 9), 128).save(png, format="PNG")
    encoded = [good.getvalue(), good.getvalue()[:200], png.getvalue(), b"not an image"]
    assert [is_jpeg(data) for data in encoded] == [True, True, False, False]
    images, reasons = decode_batch(encoded, torch.device("cpu"))
    assert reasons == [None, "image_truncated", None, "image_undecodable"]
    assert images[0].shape == (3, 10, 20) and images[2].shape == (3, 9, 7) and images[1] is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG decoding needs CUDA")
def test_nvjpeg_gpu_matches_its_cpu_twin(tmp_path, tokenizer):
    assert_gpu_matches_the_cpu_twin(build_nvjpeg_loader, tmp_path, tokenizer, "nvJPEG GPU")
