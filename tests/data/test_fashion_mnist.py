import io
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from megapgs.data import fashion_mnist as fm
from megapgs.data.shards import read_manifest

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _read_split(folder: Path) -> list[dict]:
    manifest = read_manifest(folder / "manifest.json")
    urls = [shard["path"] for shard in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_shards_hold_every_image_with_its_caption(small_fashion_mnist, tmp_path):
    manifests = fm.prepare_fashion_mnist(small_fashion_mnist, tmp_path / "fm", shard_size=100)
    assert manifests["train"]["samples"] == 240 and manifests["test"]["samples"] == 60
    assert [s["samples"] for s in manifests["train"]["shards"]] == [100, 100, 40]
    for split, (image_file, label_file) in fm.RAW_FILES.items():
        images, labels = fm.read_idx(small_fashion_mnist / image_file), fm.read_idx(small_fashion_mnist / label_file)
        samples = _read_split(tmp_path / "fm" / split)
        assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(len(images))]
        for sample, pixels, label in zip(samples, images, labels):
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), pixels)
            caption = sample["txt"].decode()
            assert caption in {t.format(c=fm.CLASSNAMES[label]) for t in fm.TEMPLATES}
            if split == "test":  # the class index, as clip_benchmark reads it
                assert int(sample["cls"]) == label
            else:
                assert "cls" not in sample
    root = tmp_path / "fm"  # clip_benchmark's webdataset layout for the held-out split
    assert (root / "classnames.txt").read_text().split("\n")[:10] == fm.CLASSNAMES
    assert "{c}" in (root / "zeroshot_classification_templates.txt").read_text()
    assert (root / "test" / "nshards.txt").read_text().strip() == "1"
    assert sorted(p.name for p in (root / "test").glob("*.tar")) == ["0.tar"]


def test_captions_mix_templates_reproducibly(small_fashion_mnist, tmp_path):
    fm.prepare_fashion_mnist(small_fashion_mnist, tmp_path / "a", shard_size=1000)
    fm.prepare_fashion_mnist(small_fashion_mnist, tmp_path / "b", shard_size=1000)
    a, b = (_read_split(tmp_path / x / "train") for x in "ab")
    assert [s["txt"] for s in a] == [s["txt"] for s in b]
    assert len({s["txt"].decode().split(" ")[1] for s in a}) > 3  # several templates in use
    assert (tmp_path / "a/train/0.tar").read_bytes() == (tmp_path / "b/train/0.tar").read_bytes()


def test_prepared_shards_are_reused_and_rebuilt_when_settings_change(small_fashion_mnist, tmp_path):
    out = tmp_path / "fm"
    fm.prepare_fashion_mnist(small_fashion_mnist, out, shard_size=100)
    stamp_time = (out / fm.STAMP).stat().st_mtime_ns
    fm.prepare_fashion_mnist(small_fashion_mnist, out, shard_size=100)
    assert (out / fm.STAMP).stat().st_mtime_ns == stamp_time
    manifests = fm.prepare_fashion_mnist(small_fashion_mnist, out, shard_size=60)
    assert len(manifests["train"]["shards"]) == 4 and sorted(p.name for p in (out / "train").glob("*.tar")) == \
        ["0.tar", "1.tar", "2.tar", "3.tar"]


def test_interrupted_preparation_leaves_nothing_that_looks_ready(small_fashion_mnist, tmp_path, monkeypatch):
    real_iter_samples = fm.iter_samples

    def broken(images, labels, seed, with_label):
        yield from list(real_iter_samples(images, labels, seed, with_label))[:10]
        raise KeyboardInterrupt

    monkeypatch.setattr(fm, "iter_samples", broken)
    with pytest.raises(KeyboardInterrupt):
        fm.prepare_fashion_mnist(small_fashion_mnist, tmp_path / "fm", shard_size=100)
    assert list(tmp_path.iterdir()) == []  # neither the data set nor its staging folder


def test_truncated_idx_file_is_an_error(tmp_path, small_fashion_mnist):
    import gzip

    data = gzip.decompress((small_fashion_mnist / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "cut.gz").write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(ValueError, match="truncated"):
        fm.read_idx(tmp_path / "cut.gz")


def test_missing_files_say_how_to_get_them(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fm.locate_raw(tmp_path / "nothing", tmp_path / "cache")


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_files_are_fashion_mnist():
    images = fm.read_idx(DEBIAN_DIR / "t10k-images-idx3-ubyte.gz")
    labels = fm.read_idx(DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10
    assert fm.read_idx(DEBIAN_DIR / "train-labels-idx1-ubyte.gz").shape == (60000,)
