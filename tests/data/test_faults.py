import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from megapgs.data.faults import (REASONS, DataError, FruitlessReads, SkipCounter, check_caption, decode_image,
                                 image_member)
from megapgs.data.prepare import DataError as DataErrorFromPrepare
from megapgs.data.shards import read_shard, write_shards


def _jpeg(mode="RGB", size=(24, 20)) -> bytes:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape).astype(np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_counter_counts_merges_and_takes(caplog):
    skips = SkipCounter()
    for _ in range(7):
        skips.add("image_truncated", "k in s.tar")
    skips.add("shard_missing", "9.tar")
    other = SkipCounter({"image_truncated": 2, "caption_empty": 1})
    skips.merge(other)
    assert skips.nonzero() == {"image_truncated": 9, "shard_missing": 1, "caption_empty": 1}
    assert set(skips.counts) == set(REASONS) and skips.total == 11
    assert "9 image_truncated" in skips.summary()
    assert caplog.text.count("image_truncated") == 5  # the first few of a reason are logged, the rest counted
    assert skips.take()["image_truncated"] == 9 and skips.total == 0
    with pytest.raises(KeyError, match="unknown skip reason"):
        skips.add("cosmic_ray")


def test_all_reduced_without_a_process_group_is_a_copy():
    skips = SkipCounter({"tar_truncated": 3})
    reduced = skips.all_reduced()
    assert reduced.counts == skips.counts and reduced is not skips


def test_data_error_is_one_class():
    assert DataError is DataErrorFromPrepare


@pytest.mark.parametrize("data,expected", [
    (b"a red dress", ("a red dress", None)), (b"  padded \n", ("padded", None)),
    (b"", (None, "caption_empty")), (b" \t\n", (None, "caption_empty")),
    (b"caf\xe9", (None, "caption_not_utf8")), (None, (None, "caption_missing")),
])
def test_check_caption(data, expected):
    assert check_caption(data) == expected


def test_decode_image_reasons():
    good = _jpeg()
    image, reason = decode_image(good)
    assert reason is None and image.mode == "RGB" and image.size == (24, 20)
    gray, reason = decode_image(_jpeg("L"))
    assert reason is None and gray.mode == "RGB"
    channels = np.asarray(gray)
    assert (channels[..., 0] == channels[..., 2]).all()
    assert decode_image(good[: len(good) * 2 // 3]) == (None, "image_truncated")
    assert decode_image(good[:200])[1] == "image_truncated"        # cut inside the header
    assert decode_image(b"\xff\xd8\xff\xe0" + bytes(300)) == (None, "image_undecodable")
    assert decode_image(b"") == (None, "image_undecodable")
    assert decode_image(None) == (None, "image_missing")
    assert image_member({"png": b"p", "txt": b"t"}) == b"p" and image_member({"txt": b"t"}) is None


def _write_set(folder, count=6, shard_size=3):
    samples = ({"__key__": f"k{i}", "jpg": _jpeg(), "txt": f"caption {i}"} for i in range(count))
    return write_shards(samples, folder, shard_size, total=count)


def test_read_shard_good_and_bad_files(tmp_path):
    _write_set(tmp_path)
    skips = SkipCounter()
    samples = list(read_shard(str(tmp_path / "0.tar"), skips))
    assert [s["__key__"] for s in samples] == ["k0", "k1", "k2"] and skips.total == 0
    assert samples[0]["txt"] == b"caption 0" and samples[0]["__url__"] == str(tmp_path / "0.tar")

    (tmp_path / "empty.tar").write_bytes(b"")
    assert list(read_shard(str(tmp_path / "empty.tar"), skips)) == []
    with tarfile.open(tmp_path / "nothing.tar", "w"):
        pass
    assert list(read_shard(str(tmp_path / "nothing.tar"), skips)) == []
    assert list(read_shard(str(tmp_path / "absent.tar"), skips)) == []
    assert skips.nonzero() == {"shard_empty": 2, "shard_missing": 1}


def test_read_shard_cut_on_a_header_is_still_truncated(tmp_path):
    """tarfile (and so webdataset) ends silently when a cut falls on a member header."""
    _write_set(tmp_path)
    data = (tmp_path / "0.tar").read_bytes()
    with tarfile.open(tmp_path / "0.tar") as archive:
        third_sample = archive.getmember("k2.jpg")
    # Cut inside k2.jpg's data, k1 is known complete; cut on or in k2.jpg's header, the reader cannot
    # tell whether k1 had more members, so k1 is lost with the rest.
    for name, cut, kept in (("on_header.tar", third_sample.offset, ["k0"]),
                            ("in_header.tar", third_sample.offset + 100, ["k0"]),
                            ("in_data.tar", third_sample.offset_data + 10, ["k0", "k1"])):
        (tmp_path / name).write_bytes(data[:cut])
        skips = SkipCounter()
        assert [s["__key__"] for s in read_shard(str(tmp_path / name), skips)] == kept, name
        assert skips.nonzero() == {"tar_truncated": 1}, name


def test_fruitless_reads_stop_when_every_shard_failed():
    fruitless = FruitlessReads(["a", "b", "c"])
    fruitless.shard_read("a")
    fruitless.shard_read("b")
    fruitless.epoch_done(SkipCounter())          # 2 of 3 shards tried: go on
    fruitless.shard_read("b")
    fruitless.good_sample()                      # a good sample resets the tally
    fruitless.shard_read("c")
    fruitless.shard_read("a")
    fruitless.epoch_done(SkipCounter())
    fruitless.shard_read("b")
    with pytest.raises(DataError, match="entirely unreadable"):
        fruitless.epoch_done(SkipCounter({"image_undecodable": 5}))


def test_fruitless_reads_bounded_on_a_large_set():
    fruitless = FruitlessReads([f"{i}.tar" for i in range(10_000)], limit=8)
    for i in range(7):
        fruitless.shard_read(f"{i}.tar")
    fruitless.epoch_done(SkipCounter())
    fruitless.shard_read("7.tar")
    with pytest.raises(DataError, match="8 shard reads"):
        fruitless.epoch_done(SkipCounter())
