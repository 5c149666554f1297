import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from megapgs.data.fashion_mnist import RAW_FILES


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">II", 2051 if array.ndim == 3 else 2049, len(array))
    if array.ndim == 3:
        header += struct.pack(">II", *array.shape[1:])
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def small_fashion_mnist(tmp_path_factory) -> Path:
    """Fashion-MNIST's four idx files, with 240 train and 60 test random images: a stand-in that
    makes preparation fast in tests (the real files are exercised by tests that say so)."""
    folder = tmp_path_factory.mktemp("fashion_mnist_raw")
    rng = np.random.default_rng(0)
    for (image_file, label_file), count in zip(RAW_FILES.values(), (240, 60)):
        write_idx(folder / image_file, rng.integers(0, 256, (count, 28, 28)))
        write_idx(folder / label_file, rng.integers(0, 10, count))
    return folder
