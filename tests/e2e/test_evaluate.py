"""Issue 7, acceptance 3: an external client. A tiny CLIP trained briefly on real Fashion-MNIST,
converted to OpenCLIP, is evaluated by the `clip_benchmark` command-line tool offline on the test
split in clip_benchmark's webdataset layout (written by our tools); its top-1 equals
tools/evaluate.py's. tools/evaluate.py itself: the OpenCLIP directory gives the megapgs
checkpoint's numbers, an image folder gives the shards' numbers, bad input is a clear error."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from megapgs.config import REPO_ROOT
from megapgs.data.fashion_mnist import prepare_fashion_mnist

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SAMPLES = 2000  # per split: enough for a model well above chance, small enough for the suite
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

pytestmark = pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist "
                                "(tools/setup.sh installs it)")


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=OFFLINE, **kwargs)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def load_tool():
    spec = importlib.util.spec_from_file_location("evaluate_tool", REPO_ROOT / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = load_tool()  # in-process: the CLI's main, without a new interpreter per call


def evaluate(capsys, *args) -> dict:
    capsys.readouterr()
    assert TOOL.main([str(arg) for arg in args]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Fashion-MNIST (2 000 train / 2 000 test), a tiny CLIP trained 120 steps on it, converted."""
    root = tmp_path_factory.mktemp("evaluate")
    data = root / "fashion_mnist"
    prepare_fashion_mnist(DEBIAN_DIR, data, shard_size=1000, max_samples=SAMPLES)
    run_dir, openclip_dir = root / "run", root / "openclip"
    run([sys.executable, "launch/pretrain.py", "--set", "data.source=webdataset",
         "--set", f"data.train_shards={data / 'train' / 'manifest.json'}", "--set", f"eval.shards={data}",
         "--set", "pgs.masking=none", "--set", "train.steps=120", "--set", "train.checkpoint_every=0",
         "--set", "eval.every_steps=0", "--set", "eval.retrieval=false", "--set", "log.progress=false",
         "--set", f"train.output_dir={run_dir}"])
    run([sys.executable, "tools/convert_to_openclip.py", str(run_dir), str(openclip_dir)])
    return {"data": data, "run": run_dir, "openclip": openclip_dir}


def test_clip_benchmark_cli_agrees_with_evaluate(capsys, trained, tmp_path):
    ours = evaluate(capsys, trained["run"], "--data", trained["data"], "--no-retrieval")
    assert ours["eval_samples"] == SAMPLES and ours["zeroshot_top1"] > 40  # trained: chance is 10%
    logged = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    in_training = [record for record in logged if record["kind"] == "eval"][-1]  # the final evaluation
    assert ours["zeroshot_top1"] == round(in_training["zeroshot_top1"], 4)  # the numbers training logs
    cli = Path(sys.executable).with_name("clip_benchmark")
    output = tmp_path / "result.json"
    run([str(cli), "eval", "--model", f"local-dir:{trained['openclip']}", "--pretrained", "",
         "--dataset", "wds/fashion_mnist", "--dataset_root", str(trained["data"]),
         "--task", "zeroshot_classification", "--batch_size", "500", "--num_workers", "0",
         "--output", str(output)])
    theirs = json.loads(output.read_text())["metrics"]
    assert abs(100 * theirs["acc1"] - ours["zeroshot_top1"]) <= 0.5, (theirs, ours)


def retrieval_set(data: Path, out: Path, samples: int = 600) -> Path:
    """The test split as clip_benchmark's retrieval layout (wds/mscoco_captions): no class names,
    `dataset_type.txt` = retrieval, 1 to 3 captions per image, one per line, none alike."""
    from megapgs.data.shards import write_shards

    classnames = (data / "classnames.txt").read_text().split("\n")
    urls = sorted(str(p) for p in (data / "test").glob("*.tar"))

    def captions():
        for n, sample in enumerate(wds.WebDataset(urls, shardshuffle=False, empty_check=False)):
            if n == samples:
                return
            name = classnames[int(sample["cls"])]
            lines = [f"a photo of a {name}, number {n}", f"{name} {n}", f"picture {n} shows a {name}"][:1 + n % 3]
            yield {"__key__": sample["__key__"], "png": sample["png"], "txt": "\n".join(lines)}

    write_shards(captions(), out / "test", 250, total=samples)
    (out / "test" / "nshards.txt").write_text(f"{len(list((out / 'test').glob('*.tar')))}\n")
    (out / "dataset_type.txt").write_text("retrieval\n")
    return out


def test_retrieval_alone_agrees_with_clip_benchmark(capsys, trained, tmp_path):
    """Retrieval on a set of several captions per image and no class names: our R@1/5/10 against
    `clip_benchmark eval --task zeroshot_retrieval` (fp32), within 0.5 points; the ranks of one
    process and of two agree exactly."""
    root = retrieval_set(trained["data"], tmp_path / "retrieval")
    ours = evaluate(capsys, trained["run"], "--data", root, "--batch-size", 100)
    assert ours["eval_samples"] == 600 and "zeroshot_top1" not in ours
    output = tmp_path / "result.json"
    cli = Path(sys.executable).with_name("clip_benchmark")
    run([str(cli), "eval", "--model", f"local-dir:{trained['openclip']}", "--pretrained", "",
         "--dataset", "wds/retrieval", "--dataset_root", str(root), "--task", "zeroshot_retrieval",
         "--recall_k", "1", "5", "10", "--batch_size", "100", "--num_workers", "0", "--no_amp",
         "--output", str(output)])
    theirs = json.loads(output.read_text())["metrics"]
    for k in (1, 5, 10):
        assert abs(100 * theirs[f"text_retrieval_recall@{k}"] - ours[f"image_to_text_R@{k}"]) <= 0.5, (theirs, ours)
        assert abs(100 * theirs[f"image_retrieval_recall@{k}"] - ours[f"text_to_image_R@{k}"]) <= 0.5, (theirs, ours)
    assert ours["text_to_image_R@10"] > 5  # trained: chance is 10 of 600 images, 1.7%
    shared = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29598", "tools/evaluate.py", str(trained["run"]), "--data", str(root), "--batch-size",
                             "100", "--workers", "1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                            env=OFFLINE)
    assert shared.returncode == 0, shared.stderr[-3000:]
    two = json.loads(shared.stdout.strip().splitlines()[-1])
    assert {k: v for k, v in two.items() if k != "eval_seconds"} == {k: v for k, v in ours.items() if k != "eval_seconds"}


def test_openclip_directory_gives_the_checkpoints_numbers(trained, capsys):
    ours = evaluate(capsys, trained["run"], "--data", trained["data"], "--max-samples", 500)
    converted = evaluate(capsys, f"local-dir:{trained['openclip']}", "--data", trained["data"], "--max-samples", 500)
    for name in ("zeroshot_top1", "zeroshot_top5", "image_to_text_R@1", "text_to_image_R@5"):
        assert converted[name] == pytest.approx(ours[name], abs=0.2), name


def test_image_folder_gives_the_shards_numbers(trained, tmp_path, capsys):
    """The test split written out as class folders (names with underscores) scores as the shards do."""
    classnames = (trained["data"] / "classnames.txt").read_text().split("\n")[:10]
    folders = [f"{index:02d}_{name.replace(' ', '_')}" for index, name in enumerate(classnames)]
    urls = sorted(str(p) for p in (trained["data"] / "test").glob("*.tar"))
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        folder = tmp_path / "images" / folders[int(sample["cls"])]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{sample['__key__']}.png").write_bytes(sample["png"])
    (tmp_path / "images" / folders[0] / "notes.txt").write_text("not an image: ignored")
    (tmp_path / "images" / folders[1] / "broken.png").write_bytes(b"\x89PNG not really")  # counted, skipped
    names = tmp_path / "names.txt"
    names.write_text("\n".join(classnames) + "\n")
    from_shards = evaluate(capsys, trained["run"], "--data", trained["data"], "--no-retrieval")
    from_folder = evaluate(capsys, trained["run"], "--images", tmp_path / "images", "--classnames", names,
                           "--templates", trained["data"] / "zeroshot_classification_templates.txt")
    assert from_folder["eval_samples"] == SAMPLES
    assert from_folder["zeroshot_top1"] == from_shards["zeroshot_top1"]
    assert "image_to_text_R@1" not in from_folder  # a folder has no captions


def test_bad_input_is_a_clear_error(trained, tmp_path, capsys):
    def fails(*args) -> str:
        capsys.readouterr()
        assert TOOL.main([str(arg) for arg in args]) == 2
        return capsys.readouterr().err

    assert "no such megapgs run" in fails(tmp_path / "nothing", "--data", trained["data"])
    assert "needs --pretrained" in fails("ViT-B-16", "--data", trained["data"])
    assert "no test/*.tar shards" in fails(trained["run"], "--data", tmp_path)
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "names.txt").write_text("one\ntwo\n")
    assert "2 names for 1 class folders" in fails(trained["run"], "--images", tmp_path / "images",
                                                  "--classnames", tmp_path / "names.txt")
