"""Shards checked once, where they are indexed: the planted faults counted, records reused after a
kill or on a grown set, a changed shard found by a stat, img2dataset's layout read as it is."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from megapgs.config import REPO_ROOT
from megapgs.data import shard_index
from megapgs.data.shard_index import index_shards, read_index, read_index_manifest, record_paths
from megapgs.data.shards import MANIFEST
from tests.data.faulty_shards import MISSING_SHARD, write_faulty_shards


def test_the_planted_faults_are_counted_and_only_good_samples_indexed(tmp_path):
    faulty = write_faulty_shards(tmp_path / "faulty")
    manifest = index_shards([str(p) for p in faulty.shards], tmp_path / "index", processes=1, progress=False)
    expected = dict(faulty.expected_skips)
    assert manifest["skips"] == expected and manifest["samples"] == len(faulty.good_keys)
    shards, trusted = read_index_manifest(tmp_path / "index" / MANIFEST)
    assert trusted and [s.path for s in shards] == [str(p.resolve()) for p in faulty.shards]
    keys = {sample.key for s in shards if s.index for sample in read_index(s.index)}
    assert keys == faulty.good_keys
    assert shards[MISSING_SHARD].skips == {"shard_missing": 1} and shards[MISSING_SHARD].index is None
    assert all(s.changed() is None for s in shards if s.size is not None)


def test_records_are_reused_and_a_changed_shard_is_indexed_again(tmp_path, monkeypatch):
    faulty = write_faulty_shards(tmp_path / "faulty")
    paths = [str(p) for p in faulty.shards[:4]]
    first = index_shards(paths, tmp_path / "index", processes=1, progress=False)
    read = []
    real = shard_index.index_shard
    monkeypatch.setattr(shard_index, "index_shard", lambda shard, out: read.append(shard) or real(shard, out))
    assert index_shards(paths, tmp_path / "index", processes=1, progress=False) == first
    assert read == []  # every record reused: nothing read again
    data = faulty.shards[3].read_bytes()
    faulty.shards[3].write_bytes(data[: len(data) // 2])  # damaged after it was indexed
    shards, _ = read_index_manifest(tmp_path / "index" / MANIFEST)
    assert shards[3].changed() == "shard_changed"  # a loader's stat sees it
    again = index_shards(paths, tmp_path / "index", processes=1, progress=False)
    assert read == [str(faulty.shards[3].resolve())]
    assert again["shards"][3]["skips"] == {"tar_truncated": 1}


def _tiny_shards(folder: Path, count: int, per_shard: int = 3) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8)).save(buffer, format="PNG")
    paths = []
    for shard in range(count):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as archive:
            for i in range(per_shard):
                for ext, data in (("png", buffer.getvalue()), ("txt", f"grey {shard} {i}".encode())):
                    info = tarfile.TarInfo(f"{shard}_{i}.{ext}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def test_the_tool_resumes_after_a_kill_with_the_manifest_of_an_uninterrupted_run(tmp_path):
    paths = _tiny_shards(tmp_path / "shards", 400)
    tool = [sys.executable, "tools/index_shards.py", str(tmp_path / "shards"), "--processes", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    whole = subprocess.run([*tool, "--out", str(tmp_path / "whole")], cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert "400 shards, 1,200 good samples; skipped 0" in whole.stdout
    killed = subprocess.Popen([*tool, "--out", str(tmp_path / "killed")], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list((tmp_path / "killed").rglob("*.json"))) < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    records = len(list((tmp_path / "killed").rglob("*.json")))
    assert 100 <= records < 400 and not (tmp_path / "killed" / MANIFEST).exists()
    resumed = subprocess.run([*tool, "--out", str(tmp_path / "killed")], cwd=REPO_ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    manifests = [json.loads((tmp_path / name / MANIFEST).read_text()) for name in ("whole", "killed")]
    assert manifests[0]["shards"] == manifests[1]["shards"] and manifests[0]["samples"] == 1200
    # the index files are the same bytes, wherever they were made
    for path in paths[:5]:
        assert (record_paths(path, tmp_path / "whole")[0].read_bytes()
                == record_paths(path, tmp_path / "killed")[0].read_bytes())


def test_img2dataset_keys_with_folder_prefixes_and_json_members(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as archive:
        for i in range(3):
            key = f"00000/{i:09d}"
            for ext, data in (("jpg", buffer.getvalue()), ("txt", b"a black square"), ("json", b'{"status": "ok"}')):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    (tmp_path / "00000_stats.json").write_text("{}")
    index_shards([str(path)], tmp_path / "index", processes=1, progress=False)
    shards, _ = read_index_manifest(tmp_path / "index" / MANIFEST)
    assert [s.key for s in read_index(shards[0].index)] == [f"00000/{i:09d}" for i in range(3)]
