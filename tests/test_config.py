import copy
import json
from pathlib import Path

import pydantic
import pytest

from megapgs.config import (
    DEFAULT_CONFIG, REPO_ROOT, SECTIONS, Config, ConfigError, explain, load_config, read_json, validate,
)

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.json"))
TINY = read_json(DEFAULT_CONFIG)


def test_seven_configs_ship():
    assert {p.stem for p in CONFIGS} == {"tiny_cpu", "vitb16_pgs03", "vitb16_pgs05",
                                         "vitl_pgs03", "vitl_pgs05", "vith_pgs03", "vitg_pgs03"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.model_dump(mode="json")  # round-trips to JSON for the run directory


def test_paper_recipe_values():
    cfg03, cfg05 = load_config(REPO_ROOT / "configs/vitb16_pgs03.json"), load_config(REPO_ROOT / "configs/vitb16_pgs05.json")
    assert (cfg03.model.arch, cfg03.train.global_batch_size, cfg03.train.micro_batch_size) == ("ViT-B-16", 4096, 512)
    assert (cfg03.train.epochs, cfg03.optim.lr, cfg03.optim.warmup_steps) == (32, 1e-3, 10000)
    assert (cfg03.pgs.candidate_ratio, cfg03.pgs.sim_threshold, cfg03.pgs.use_edges, cfg03.pgs.use_ot) == (0.05, 0.5, True, True)
    assert (cfg03.pgs.min_mask_ratio, cfg05.pgs.min_mask_ratio) == (0.3, 0.5)
    assert cfg03.train.local_loss and cfg03.train.gather_with_grad and cfg03.model.grad_checkpointing
    for name in ("vitl_pgs03", "vitl_pgs05", "vith_pgs03", "vitg_pgs03"):  # the recipe of docs/SCALING.md
        cfg = load_config(REPO_ROOT / f"configs/{name}.json")
        assert (cfg.zero_stage, cfg.precision, cfg.deepspeed["data_types"]["grad_accum_dtype"]) == (1, "bf16", "fp32")
        assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.warmup_steps) == (5e-4, (0.9, 0.95), 1e-6, 10000)
        assert (cfg.pgs.unmasked_tail, cfg.model.grad_checkpointing, cfg.train.global_batch_size) == (0.064, False, 32768)


def _with(change):
    raw = copy.deepcopy(TINY)
    change(raw)
    return raw


BAD_CONFIGS = {
    # name: (edit of the embedded default, key path the message must name, a phrase it must hold)
    "misspelt key": (lambda r: r["pgs"].update(candidat_ratio=0.1), "pgs.candidat_ratio", "did you mean 'candidate_ratio'"),
    "misspelt section": (lambda r: r.update(trian={}), "trian", "did you mean 'train'"),
    "negative lr": (lambda r: r["optim"].update(lr=-1e-3), "optim.lr", "greater than 0"),
    "min_mask_ratio 1": (lambda r: r["pgs"].update(min_mask_ratio=1.0), "pgs.min_mask_ratio", "less than 1"),
    "min_mask_ratio above 1": (lambda r: r["pgs"].update(min_mask_ratio=1.5), "pgs.min_mask_ratio", "less than 1"),
    "unknown architecture": (lambda r: r["model"].update(arch="ViT-L-14x"), "model.arch", "did you mean 'ViT-L-14'"),
    "OpenCLIP arch megapgs does not compute": (lambda r: r["model"].update(arch="ViT-B-16-quickgelu"), "model.arch",
                                               "OpenCLIP's ViT-B-16-quickgelu config: model_cfg.quick_gelu = true"),
    "missing arch file": (lambda r: r["model"].update(arch="/no/such/cfg.json"), "model.arch", "no model-config JSON"),
    "missing data path": (lambda r: r["data"].update(source="webdataset"), "data.train_shards", "required"),
    "wrong type (string for int)": (lambda r: r["train"].update(steps="100"), "train.steps", "valid integer"),
    "wrong type (int for bool)": (lambda r: r["pgs"].update(use_ot=1), "pgs.use_ot", "valid boolean"),
    "value not allowed": (lambda r: r["pgs"].update(ot="sinkhorn"), "pgs.ot", "'entropic' or 'reference'"),
    "unknown attention": (lambda r: r["model"].update(attention="flash"), "model.attention", "'torch_varlen'"),
    "keep bounds": (lambda r: r["pgs"].update(min_mask_ratio=0.95), "pgs.min_keep_ratio", "1 - min_mask_ratio"),
    "steps and epochs": (lambda r: r["train"].update(epochs=2), "train.steps", "exactly one"),
    "batch split": (lambda r: r["train"].update(global_batch_size=100, micro_batch_size=64), "train.global_batch_size", "multiple"),
    "crop scale": (lambda r: r["data"].update(crop_scale=[0.9, 0.5]), "data.crop_scale", "low <= high"),
    "loader timeout": (lambda r: r["data"].update(timeout_s=0), "data.timeout_s", "greater than 0"),
    "deepspeed batch key": (lambda r: r["deepspeed"].update(train_batch_size=64), "deepspeed.train_batch_size", "set by megapgs"),
    "deepspeed zero stage": (lambda r: r["deepspeed"]["zero_optimization"].update(stage=4), "deepspeed.zero_optimization.stage", "0, 1, 2, 3"),
    "deepspeed zero key": (lambda r: r["deepspeed"]["zero_optimization"].update(overlap_com=True),
                           "deepspeed.zero_optimization.overlap_com", "Extra inputs"),
    "deepspeed missing file": (lambda r: r.update(deepspeed="/no/such/ds.json"), "deepspeed", "no DeepSpeed JSON"),
    "eval data of a webdataset run": (lambda r: r["data"].update(source="webdataset", train_shards="/x/{0..3}.tar"),
                                      "eval.shards", "required"),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_bad_config_names_the_key(name):
    edit, key_path, phrase = BAD_CONFIGS[name]
    with pytest.raises(ConfigError) as info:
        validate(_with(edit))
    message = str(info.value)
    assert f"\n  {key_path}: " in message, message
    assert phrase in message, message


def test_every_error_is_reported_at_once():
    raw = _with(lambda r: (r["optim"].update(lr=-1), r["pgs"].update(ot="x"), r["log"].update(levle="info")))
    message = str(pytest.raises(ConfigError, validate, raw).value)
    assert "optim.lr" in message and "pgs.ot" in message and "log.levle" in message


def test_overrides_apply_and_parse_json():
    cfg = load_config(None, ["optim.lr=5e-4", "pgs.masking=random", "data.crop_scale=[0.8, 1.0]",
                             "train.output_dir=123", "eval.max_samples=null", "pgs.use_ot=false",
                             "deepspeed.zero_optimization.stage=2"])
    assert cfg.optim.lr == 5e-4 and cfg.pgs.masking == "random" and cfg.data.crop_scale == (0.8, 1.0)
    assert cfg.train.output_dir == "123"  # a string field keeps the text as it is
    assert cfg.pgs.use_ot is False and cfg.zero_stage == 2 and cfg.eval.max_samples is None


@pytest.mark.parametrize("assignment,key_path", [
    ("optim.lr=-1", "optim.lr"),
    ("pgs.candidat_ratio=0.1", "pgs.candidat_ratio"),
    ("train.steps=ten", "train.steps"),
    ("model.arch=ViT-Q-99", "model.arch"),
])
def test_overrides_are_validated_like_files(assignment, key_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, [assignment])
    assert f"  {key_path}: " in str(info.value) and "--set" in str(info.value)


@pytest.mark.parametrize("assignment", ["optim.lr", "=3", "optim..lr=3", "optim.lr.x=3"])
def test_malformed_override(assignment):
    with pytest.raises(ConfigError):
        load_config(None, [assignment])


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(pydantic.ValidationError):
        cfg.optim.lr = 1.0


def test_deepspeed_section_from_a_path(tmp_path):
    ds = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = validate(_with(lambda r: r.update(deepspeed=str(tmp_path / "ds.json"))))
    assert cfg.deepspeed == ds and cfg.zero_stage == 3 and cfg.precision == "bf16"


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")


def test_explain_lists_every_option_with_its_default():
    text = explain()
    for section, schema in SECTIONS.items():
        for key, field in schema.model_fields.items():
            default = field.default_factory() if field.default_factory else field.default
            assert f"  {section}.{key} = {json.dumps(default)}\n" in text + "\n", (section, key)
            assert field.description, f"{section}.{key} has no description"
    assert set(Config.model_fields) == set(SECTIONS) | {"deepspeed"}


@pytest.mark.parametrize("arch", ["ViT-M-16", "ViT-L-14-336", "tiny-32"])
def test_model_arch_takes_openclip_names(arch):
    assert load_config(None, [f"model.arch={arch}"]).model.arch == arch


def test_model_arch_takes_a_model_config_json(tmp_path):
    from megapgs.convert.openclip import openclip_model_cfg
    from megapgs.models.archs import get_arch

    cfg = openclip_model_cfg(get_arch("tiny-28"))
    (tmp_path / "ok.json").write_text(json.dumps(cfg))
    assert load_config(None, [f"model.arch={tmp_path / 'ok.json'}"]).model.arch == str(tmp_path / "ok.json")
    (tmp_path / "gelu.json").write_text(json.dumps({**cfg, "text_cfg": {**cfg["text_cfg"], "act_kwargs": {"x": 1}}}))
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"model.arch={tmp_path / 'gelu.json'}"])
    assert f"  model.arch: {tmp_path / 'gelu.json'}: model_cfg.text_cfg.act_kwargs = " in str(info.value)


def test_explain_lists_what_model_arch_takes():
    from megapgs.models.archs import openclip_arch_names

    text = explain()
    assert "        tiny-28  " in text and "        ViT-M-16  " in text
    for name in openclip_arch_names():
        assert f"\n        {name} " in text, name
    assert "ViT-B-16-quickgelu" not in text and "or a model-config JSON in OpenCLIP's form" in text


def test_readme_lists_what_model_arch_takes():
    """The README's model.arch table names exactly the OpenCLIP configs megapgs computes (open_clip's
    bundled set changes with its version: regenerate the row from `--explain`)."""
    import re

    from megapgs.models.archs import openclip_arch_names

    readme = (REPO_ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| an OpenCLIP model-config name |"))
    names = set(openclip_arch_names())
    assert set(re.findall(r"`([^`]+)`", row)) == names and f"any of the {len(names)} configs" in row
    assert "| `tiny-28` |" in readme and "| `path/to/cfg.json` |" in readme


def test_explain_command_runs():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "megapgs.config", "--explain"], capture_output=True, text=True,
                         cwd=REPO_ROOT, check=True).stdout
    assert "pgs.min_mask_ratio = 0.3" in out and "deepspeed = " in out


def test_empty_config_is_the_schema_defaults():
    assert validate({}) == Config()
    assert Path(DEFAULT_CONFIG).name == "tiny_cpu.json"


def test_an_optional_string_is_cleared_with_null():
    cfg = load_config(None, ["eval.shards=/data/eval", "train.init_from=null"])
    assert cfg.eval.shards == "/data/eval" and cfg.train.init_from is None
    assert load_config(None, ["eval.shards=null"]).eval.shards is None
    assert load_config(None, ["train.output_dir=null"]).train.output_dir == "null"  # a required string stays text
