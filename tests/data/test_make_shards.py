import csv
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megapgs.data.shards import read_manifest, write_dali_index
from megapgs.data.eval_data import iter_eval_batches

REPO_ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_shards", REPO_ROOT / "tools" / "make_shards.py")
make_shards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_shards)


def _image_folder(folder: Path) -> list[tuple[str, str]]:
    """Seven images in four formats, one corrupt file; rows with a missing image and an empty caption."""
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (fmt, ext) in enumerate([("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp")] * 2):
        if i < 7:
            pixels = rng.integers(0, 255, (20, 30, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(folder / "sub" / f"{i}.{ext}", format=fmt)
    (folder / "sub" / "bad.jpg").write_bytes(b"not an image")
    return [("sub/0.jpg", "zero"), ("sub/1.png", "one"), ("sub/2.webp", "two"), ("sub/3.bmp", "three"),
            ("sub/4.jpg", "  "), ("sub/5.png", "five"), ("sub/missing.jpg", "gone"), ("sub/bad.jpg", "bad"),
            ("sub/6.webp", "six")]


def _read_all(out: Path) -> list[dict]:
    import webdataset as wds
    urls = [s["path"] for s in read_manifest(out / "manifest.json")["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_folder_with_csv(tmp_path, capsys):
    rows = _image_folder(tmp_path / "images")
    with (tmp_path / "captions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filepath", "caption", "source_url"])
        writer.writerows((name, caption, f"http://x/{i}") for i, (name, caption) in enumerate(rows))
    out = tmp_path / "shards"
    assert make_shards.main(["folder", str(tmp_path / "images"), str(tmp_path / "captions.csv"),
                             "--out", str(out), "--shard-size", "4"]) == 0
    summary = capsys.readouterr().out
    assert "wrote 6 samples in 2 shards" in summary
    assert "1 image_undecodable" in summary and "1 image_missing" in summary and "1 caption_empty" in summary
    manifest = read_manifest(out / "manifest.json")
    assert [s["samples"] for s in manifest["shards"]] == [4, 2] and manifest["samples"] == 6
    samples = _read_all(out)
    assert [s["txt"].decode() for s in samples] == ["zero", "one", "two", "three", "five", "six"]
    stored_as = [next(e for e in ("jpg", "png", "webp") if e in s) for s in samples]
    assert stored_as == ["jpg", "png", "webp", "png", "png", "webp"]
    assert json.loads(samples[3]["json"]) == {"source": "sub/3.bmp", "source_url": "http://x/3"}  # BMP stored as PNG
    assert (out / "0.idx").read_text().startswith("v1.2 4\n") and (out / "nshards.txt").read_text() == "2\n"


def test_folder_with_jsonl_and_named_columns(tmp_path):
    rows = _image_folder(tmp_path / "images")
    lines = [json.dumps({"img": name, "alt": caption}) for name, caption in rows[:3]]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    assert make_shards.main(["folder", str(tmp_path / "images"), str(tmp_path / "captions.jsonl"), "--out", str(out),
                             "--image-column", "img", "--caption-column", "alt"]) == 0
    assert [s["__key__"] for s in _read_all(out)] == ["000000000", "000000001", "000000002"]
    with pytest.raises(SystemExit, match="no caption column"):
        make_shards.main(["folder", str(tmp_path / "images"), str(tmp_path / "captions.jsonl"), "--out", str(out),
                          "--image-column", "img"])


def test_parquet_needs_pyarrow(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "captions.parquet").write_bytes(b"PAR1")
    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(SystemExit, match="parquet needs pyarrow"):
            make_shards.main(["folder", str(tmp_path / "images"), str(tmp_path / "captions.parquet"),
                              "--out", str(tmp_path / "out")])
    else:  # pragma: no cover - pyarrow is not a dependency
        pytest.skip("pyarrow installed: the parquet path is covered by pyarrow's reader")


def test_fashion_mnist_mode(small_fashion_mnist, tmp_path, capsys):
    out = tmp_path / "fm"
    assert make_shards.main(["fashion-mnist", "--raw", str(small_fashion_mnist), "--out", str(out),
                             "--shard-size", "100"]) == 0
    assert "wrote 240 samples in 3 shards" in capsys.readouterr().out
    for split in ("train", "test"):
        manifest = read_manifest(out / split / "manifest.json")
        assert all(Path(s["path"]).with_suffix(".idx").is_file() for s in manifest["shards"])
    keys, labels = [], []
    for _, batch_labels, captions, batch_keys in iter_eval_batches(
            [s["path"] for s in read_manifest(out / "test" / "manifest.json")["shards"]], image_size=28, batch_size=32):
        keys += batch_keys
        labels += batch_labels.tolist()
    assert len(keys) == 60 and min(labels) >= 0 and (out / "classnames.txt").is_file()


def test_index_matches_wds2idx_and_dali_reads_it(tmp_path):
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3)).astype(np.uint8)).save(buffer, format="JPEG")
    from megapgs.data.shards import write_shards
    write_shards(({"__key__": f"k{i}", "jpg": buffer.getvalue(), "txt": f"c {i}", "json": "{}"} for i in range(5)),
                 tmp_path, 10)
    ours = (tmp_path / "0.idx").read_text()
    assert write_dali_index(tmp_path / "0.tar", tmp_path / "again.idx") == 5
    wds2idx = pytest.importorskip("wds2idx")  # DALI's own indexer, shipped with DALI
    with wds2idx.IndexCreator(str(tmp_path / "0.tar"), str(tmp_path / "dali.idx"), verbose=False) as creator:
        creator.create_index()
    assert ours == (tmp_path / "dali.idx").read_text()
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn

    @dali.pipeline_def(batch_size=5, num_threads=1, device_id=None)
    def read():
        return tuple(fn.readers.webdataset(paths=[str(tmp_path / "0.tar")], index_paths=[str(tmp_path / "0.idx")],
                                           ext=["jpg", "txt"]))

    pipe = read()
    pipe.build()
    jpegs, texts = pipe.run()
    assert [bytes(texts.at(i)).decode() for i in range(5)] == [f"c {i}" for i in range(5)]
    assert bytes(jpegs.at(0)) == buffer.getvalue()
