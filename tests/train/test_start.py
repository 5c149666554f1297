"""Where a run starts: resume beats init_from, a fresh run never overwrites another's checkpoints,
and a wrong init_from is refused before anything heavy runs."""
import json

import pytest

from megapgs.config import load_config
from megapgs.convert.init_weights import INIT_JSON
from megapgs.train.checkpoint import COMPLETE
from megapgs.train.start import StartError, StartPoint, decide_start


def config(tmp_path, *overrides):
    return load_config(None, [f"train.output_dir={tmp_path / 'run'}", *overrides])


def complete_checkpoint(run_dir, step: int, arch: str = "tiny-28"):
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / COMPLETE).write_text(json.dumps({"step": step, "config": {"model": {"arch": arch}}}))
    return path


def init_dir(folder, arch: str):
    folder.mkdir()
    (folder / INIT_JSON).write_text(json.dumps({"format": "megapgs-init-weights", "format_version": 1, "arch": arch}))
    return folder


def test_fresh_run_in_an_empty_directory(tmp_path):
    assert decide_start(config(tmp_path)) == StartPoint(None, None)
    assert decide_start(config(tmp_path, "train.resume=auto")) == StartPoint(None, None)


def test_a_fresh_run_does_not_overwrite_another_runs_checkpoints(tmp_path):
    complete_checkpoint(tmp_path / "run", 400)
    with pytest.raises(StartError, match=r"already holds checkpoints \(newest step_00000400\).*--resume auto"):
        decide_start(config(tmp_path))


def test_resume_takes_precedence_over_init_from(tmp_path):
    newest = complete_checkpoint(tmp_path / "run", 800)
    complete_checkpoint(tmp_path / "run", 400)
    start = decide_start(config(tmp_path, "train.resume=auto", f"train.init_from={tmp_path / 'absent'}"))
    assert start == StartPoint(newest, None)


def test_init_from_is_checked_before_the_run(tmp_path):
    good = init_dir(tmp_path / "init28", "tiny-28")
    assert decide_start(config(tmp_path, f"train.init_from={good}")) == StartPoint(None, str(good))
    other = init_dir(tmp_path / "init32", "tiny-32")
    with pytest.raises(StartError, match="holds tiny-32 weights but model.arch is 'tiny-28'"):
        decide_start(config(tmp_path, f"train.init_from={other}"))
    with pytest.raises(StartError, match="neither a megapgs initial checkpoint"):
        decide_start(config(tmp_path, f"train.init_from={tmp_path / 'absent'}"))
    complete_checkpoint(tmp_path / "other_run", 10, arch="tiny-32")  # a megapgs run as initial weights
    with pytest.raises(StartError, match="holds tiny-32 weights"):
        decide_start(config(tmp_path, f"train.init_from={tmp_path / 'other_run'}"))


def test_a_resume_path_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(StartError, match="no complete megapgs checkpoint"):
        decide_start(config(tmp_path, f"train.resume={tmp_path / 'nowhere'}"))


def test_init_from_at_another_image_size_is_accepted(tmp_path):
    """Only the image size may differ (the positional embeddings are interpolated when loading)."""
    from megapgs.convert.openclip import openclip_model_cfg
    from megapgs.models.archs import get_arch

    good = init_dir(tmp_path / "init28", "tiny-28")
    cfg = openclip_model_cfg(get_arch("tiny-28"))
    for name, vision in (("tiny56.json", {"image_size": 56}), ("tiny56p8.json", {"image_size": 56, "patch_size": 8})):
        (tmp_path / name).write_text(json.dumps({**cfg, "vision_cfg": {**cfg["vision_cfg"], **vision}}))
    assert decide_start(config(tmp_path, f"train.init_from={good}", f"model.arch={tmp_path / 'tiny56.json'}")) \
        == StartPoint(None, str(good))
    with pytest.raises(StartError, match="differ in vision.patch_size 4 vs 8"):
        decide_start(config(tmp_path, f"train.init_from={good}", f"model.arch={tmp_path / 'tiny56p8.json'}"))
