"""model.arch: megapgs's own names, any OpenCLIP model config whose towers megapgs computes (numbers
read from open_clip), a model-config JSON; options megapgs does not compute are refused by name."""
import json
import subprocess
import sys

import open_clip
import pytest

from megapgs.config import REPO_ROOT
from megapgs.models.archs import OWN_ARCHS, ArchError, get_arch, init_mismatch, openclip_arch_names

# The paper's and the architectures; each must stay computable.
EXPECTED = {"ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-g-14", "ViT-bigG-14", "ViT-M-16", "ViT-S-16",
            "ViT-L-14-336", "ViT-H-14-378"}
CUSTOM = {"embed_dim": 48,
          "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 1}}


@pytest.mark.parametrize("name", sorted(openclip_arch_names()))
def test_openclip_archs_carry_openclips_numbers(name):
    spec, oc = get_arch(name), open_clip.get_model_config(name)
    vision, text = oc["vision_cfg"], oc["text_cfg"]
    assert (spec.name, spec.openclip_name, spec.embed_dim) == (name, name, oc["embed_dim"])
    assert (spec.vision.image_size, spec.vision.patch_size) == (vision["image_size"], vision["patch_size"])
    assert (spec.vision.width, spec.vision.layers) == (vision["width"], vision["layers"])
    assert spec.vision.head_width == vision.get("head_width", 64)
    assert spec.vision.mlp_ratio == vision.get("mlp_ratio", 4.0)
    assert (spec.text.context_length, spec.text.vocab_size) == (text["context_length"], text["vocab_size"])
    assert (spec.text.width, spec.text.heads, spec.text.layers) == (text["width"], text["heads"], text["layers"])
    assert spec.text.mlp_ratio == text.get("mlp_ratio", 4.0)


def test_which_openclip_configs_are_computed():
    names = set(openclip_arch_names())
    assert EXPECTED <= names
    assert not names & {"RN50", "ViT-B-16-quickgelu", "coca_ViT-B-32", "ViT-M-16-alt", "ViT-B-16-SigLIP",
                        "ViT-L-14-CLIPA", "convnext_base", "EVA02-B-16"}


@pytest.mark.parametrize("name, option", [
    ("ViT-M-16-alt", "vision_cfg.ls_init_value = 0.0001 (LayerScale)"),
    ("RN50", "vision_cfg.layers = [3, 4, 6, 3] (a ModifiedResNet image tower)"),
    ("ViT-B-16-quickgelu", "model_cfg.quick_gelu = true (QuickGELU"),
    ("ViT-L-14-CLIPA", "vision_cfg.no_ln_pre = true"),
    ("coca_ViT-B-32", "model_cfg.multimodal_cfg (a CoCa text decoder)"),
])
def test_openclip_config_megapgs_does_not_compute_is_refused_by_option(name, option):
    with pytest.raises(ArchError) as info:
        get_arch(name)
    assert f"OpenCLIP's {name} config: " in str(info.value) and option in str(info.value)


def test_paper_shapes():
    l14 = get_arch("ViT-L-14").vision
    assert (l14.grid, l14.num_patches, l14.heads) == (16, 256, 16)
    assert get_arch("tiny-28").vision.num_patches == 49
    assert get_arch("ViT-H-14-378").vision.grid == 27


def test_model_config_json(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(CUSTOM))
    spec = get_arch(str(path))
    assert (spec.name, spec.openclip_name, spec.embed_dim) == (str(path), None, 48)
    assert (spec.vision.grid, spec.vision.heads, spec.vision.mlp_width) == (4, 2, 256)
    assert (spec.text.context_length, spec.text.width, spec.text.heads, spec.text.layers) == (16, 48, 2, 1)
    wrapped = tmp_path / "open_clip_config.json"  # an OpenCLIP model directory's config
    wrapped.write_text(json.dumps({"model_cfg": CUSTOM, "preprocess_cfg": {}}))
    assert get_arch(str(wrapped)).numbers() == spec.numbers()
    assert get_arch(spec) is spec


def _edit(section, **change):
    return {**CUSTOM, section: {**CUSTOM[section], **change}} if section != "model_cfg" else {**CUSTOM, **change}


@pytest.mark.parametrize("model_cfg, phrase", [
    (_edit("model_cfg", quick_gelu=True), "model_cfg.quick_gelu = true (QuickGELU"),
    (_edit("vision_cfg", attentional_pool=True), "model_cfg.vision_cfg.attentional_pool = true"),
    (_edit("text_cfg", pool_type="eos"), "model_cfg.text_cfg.pool_type = \"eos\""),
    (_edit("vision_cfg", rope=True), "model_cfg.vision_cfg.rope: not an option of OpenCLIP's CLIPVisionCfg"),
    (_edit("vision_cfg", image_size=30), "vision_cfg.image_size = 30: not a multiple of vision_cfg.patch_size = 8"),
    (_edit("vision_cfg", width=72), "vision_cfg.width = 72: not a multiple of vision_cfg.head_width = 32"),
    (_edit("text_cfg", heads=5), "text_cfg.width = 48: not a multiple of text_cfg.heads = 5"),
    (_edit("text_cfg", vocab_size=1000), "text_cfg.vocab_size = 1000: megapgs tokenizes with OpenCLIP's BPE"),
    (_edit("vision_cfg", layers="2"), "vision_cfg.layers = \"2\": expected a positive integer"),
    (_edit("model_cfg", embed_dim=0), "model_cfg.embed_dim = 0: expected a positive integer"),
    ({"vision_cfg": CUSTOM["vision_cfg"], "text_cfg": CUSTOM["text_cfg"]}, "model_cfg.embed_dim: missing"),
])
def test_model_config_json_megapgs_does_not_compute_is_refused_by_option(tmp_path, model_cfg, phrase):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(model_cfg))
    with pytest.raises(ArchError) as info:
        get_arch(str(path))
    assert str(info.value).startswith(f"{path}: model_cfg") and phrase in str(info.value), str(info.value)


def test_unreadable_model_config_json(tmp_path):
    with pytest.raises(ArchError, match="no model-config JSON at"):
        get_arch(str(tmp_path / "absent.json"))
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(ArchError, match="not valid JSON"):
        get_arch(str(tmp_path / "bad.json"))


def test_unknown_arch():
    with pytest.raises(ArchError, match=r"unknown architecture 'ViT-X-16' \(did you mean 'ViT-[A-Za-z]-16'\?\); "
                                        r"allowed: tiny-28, tiny-32, one of OpenCLIP's \d+ ViT configs"):
        get_arch("ViT-X-16")


def test_init_mismatch_lets_only_the_image_size_differ(tmp_path):
    path = tmp_path / "tiny56.json"
    tiny = get_arch("tiny-28")
    from megapgs.convert.openclip import openclip_model_cfg

    cfg = openclip_model_cfg(tiny)
    path.write_text(json.dumps({**cfg, "vision_cfg": {**cfg["vision_cfg"], "image_size": 56}}))
    assert init_mismatch(tiny, get_arch(str(path))) == []
    assert "vision.patch_size 4 vs 8" in init_mismatch(tiny, get_arch("tiny-32"))
    assert init_mismatch(get_arch("ViT-L-14"), get_arch("ViT-L-14-336")) == []
    assert init_mismatch(get_arch("ViT-L-14"), get_arch("ViT-L-16")) == ["vision.patch_size 14 vs 16"]


def test_own_archs_validate_without_importing_open_clip():
    """The embedded default validates instantly: OpenCLIP's configs are read only for other archs."""
    code = ("import sys; from megapgs.config import load_config; load_config(None, ['model.arch=tiny-32']); "
            "print('open_clip imported:', 'open_clip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "open_clip imported: False"
    assert set(OWN_ARCHS) == {"tiny-28", "tiny-32"}
