"""Shards as img2dataset writes them train and evaluate as they are: `{key}.jpg`, `.txt`, `.json` per
sample (keys with a folder prefix), `_stats.json` and `.parquet` files beside the tars, no manifest;
with the webdataset loader (nothing indexed) and DALI's CPU mode (indexed once, by the run)."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from megapgs.data.fashion_mnist import prepare_fashion_mnist
from tests.e2e.test_train import run, train_cmd, train_records


def write_img2dataset_shards(folder, shards: int = 3, per_shard: int = 8) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as archive:
            for i in range(per_shard):
                key = f"{shard:05d}/{shard:05d}{i:04d}"
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (36, 30, 3), dtype=np.uint8)).save(buffer, format="JPEG")
                meta = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success", "width": 30}
                for ext, data in (("jpg", buffer.getvalue()), ("txt", f"a photo number {i}".encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
        (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read by megapgs PAR1")


@pytest.mark.parametrize("loader", ["wds", "dali"])
def test_img2dataset_shards_train_and_evaluate(tmp_path, small_fashion_mnist, loader):
    write_img2dataset_shards(tmp_path / "laion")
    prepare_fashion_mnist(small_fashion_mnist, tmp_path / "eval", shard_size=40)  # a clip_benchmark eval set
    run_dir = tmp_path / "run"
    result = run(train_cmd(run_dir, "--set", "data.source=webdataset",
                           "--set", f"data.train_shards={tmp_path / 'laion'}/{{00000..00002}}.tar",
                           "--set", f"data.loader={loader}", "--set", f"data.index_dir={tmp_path / 'index'}",
                           "--set", "train.steps=4", "--set", "train.micro_batch_size=8",
                           "--set", "train.global_batch_size=8", "--set", "data.workers=0",
                           "--set", f"eval.shards={tmp_path / 'eval'}", "--set", "eval.zeroshot=true",
                           "--set", "eval.retrieval=false", "--set", "eval.every_steps=0"))
    assert "trained 4 steps" in result.stdout and "zero-shot top-1" in result.stdout
    records = train_records(run_dir)
    assert sorted(records) == [1, 2, 3, 4]
    assert not any(key.startswith("skipped_") for record in records.values() for key in record)
    indexed = list((tmp_path / "index").rglob("manifest.json"))
    assert len(indexed) == (1 if loader == "dali" else 0)  # only the GPU loaders need the index
    if indexed:
        manifest = json.loads(indexed[0].read_text())
        assert manifest["samples"] == 24 and len(manifest["shards"]) == 3  # the .json/.parquet files: not shards
