"""OpenCLIP model configs <-> megapgs ArchSpecs: the one place that decides which OpenCLIP options
megapgs's towers compute, for `model.arch` and for both conversion tools.

An OpenCLIP model config ({"embed_dim", "vision_cfg", "text_cfg", ...}: open_clip's bundled
model_configs/*.json, a JSON file of that form, or "model_cfg" in an OpenCLIP model directory's
open_clip_config.json) becomes an ArchSpec when each option is an architecture number (STRUCTURE),
OpenCLIP's default (what megapgs's towers compute), or listed in NO_EFFECT as not changing the
function of the weights. Anything else is refused with ArchError naming the option (QuickGELU,
attentional pooling, a timm or Hugging Face tower, LayerScale, ...); so are numbers megapgs cannot
build (a grid that does not tile the image, heads that do not divide the width, a vocabulary smaller
than the tokenizer's). OpenCLIP's defaults are read from its own CLIPVisionCfg and CLIPTextCfg.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

from megapgs.models.archs import OWN_ARCHS, ArchError, ArchSpec, TextSpec, VisionSpec

# The numbers that make an architecture; every other option must be OpenCLIP's default (what
# megapgs's towers compute) or be listed below as having no effect on the function of the weights.
STRUCTURE = {"vision_cfg": ("image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio"),
             "text_cfg": ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")}
NO_EFFECT = {
    "model_cfg": ("init_logit_scale",        # initial value only: the weights hold logit_scale
                  "init_logit_bias",         # likewise; not null means the weights have a logit_bias
                  "nonscalar_logit_scale",   # shape (1,) instead of 0-d: the key map reshapes
                  "output_dict"),            # the format of forward's output
    "vision_cfg": ("output_tokens",          # the format of forward's output
                   "patch_dropout"),         # training-time token dropout; megapgs masks with pgs.masking
    "text_cfg": ("output_tokens",
                 "pad_id",                   # used only with embed_cls / no_causal_mask, refused here
                 "eos_id",                   # used only by pool_type "eos", refused here
                 "hf_model_pretrained"),     # used only with hf_model_name, refused here
}
TOP_LEVEL_DEFAULTS = {"quick_gelu": False, "custom_text": False}
HINTS = {"quick_gelu": "QuickGELU, as in OpenAI-trained weights", "custom_text": "CustomTextCLIP layout",
         "multimodal_cfg": "a CoCa text decoder", "timm_model_name": "a timm image tower",
         "hf_model_name": "a Hugging Face text tower", "attentional_pool": "attentional pooling",
         "layers": "a ModifiedResNet image tower",
         "ls_init_value": "LayerScale", "no_ln_pre": "no LayerNorm before the image blocks"}
TOKENIZER_VOCAB = 49408  # OpenCLIP's BPE, which megapgs tokenizes with


def _refuse(where: str, value: Any, default: Any) -> ArchError:
    key = where.rsplit(".", 1)[-1]
    hint = f" ({HINTS[key]})" if key in HINTS else ""
    return ArchError(f"{where} = {json.dumps(value)}{hint}: megapgs's towers compute only OpenCLIP's default "
                     f"({json.dumps(default)}); weights of this config would compute a different function")


def _tower_structure(section: str, given: Any, cfg_class: type, where: str) -> dict[str, Any]:
    """The tower's architecture numbers; any other option that differs from OpenCLIP's default is refused."""
    if not isinstance(given, dict):
        raise ArchError(f"{where}.{section}: expected an object, got {json.dumps(given)}")
    defaults = {field.name: field.default for field in dataclasses.fields(cfg_class)}
    for key, value in given.items():
        if key not in defaults:
            raise ArchError(f"{where}.{section}.{key}: not an option of OpenCLIP's {cfg_class.__name__}")
        if key in STRUCTURE[section] or key in NO_EFFECT[section]:
            continue
        if value != defaults[key] and not (key == "block_type" and value == "default"):
            raise _refuse(f"{where}.{section}.{key}", value, defaults[key])
    structure = {key: given.get(key, defaults[key]) for key in STRUCTURE[section]}
    if section == "vision_cfg":
        if isinstance(structure["layers"], (list, tuple)):
            raise _refuse(f"{where}.vision_cfg.layers", structure["layers"], defaults["layers"])
        size = structure["image_size"]
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or size[0] != size[1]:
                raise ArchError(f"{where}.vision_cfg.image_size = {json.dumps(size)}: megapgs's image tower "
                                "takes square images")
            structure["image_size"] = size[0]
    for key, value in structure.items():
        number = (int, float) if key == "mlp_ratio" else int
        if isinstance(value, bool) or not isinstance(value, number) or value <= 0:
            kind = "a positive number" if key == "mlp_ratio" else "a positive integer"
            raise ArchError(f"{where}.{section}.{key} = {json.dumps(value)}: expected {kind}")
    return structure


def structure(model_cfg: Any, where: str = "model_cfg") -> dict[str, Any]:
    """{"embed_dim", "vision_cfg", "text_cfg"} with the architecture numbers of an OpenCLIP model
    config, or ArchError naming the first option (`where` prefixes its path) megapgs does not compute."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    if not isinstance(model_cfg, dict):
        raise ArchError(f"{where}: expected an object, got {json.dumps(model_cfg)}")
    known = {"embed_dim", "vision_cfg", "text_cfg", *TOP_LEVEL_DEFAULTS, *NO_EFFECT["model_cfg"]}
    for key, value in model_cfg.items():
        if key not in known:
            hint = f" ({HINTS[key]})" if key in HINTS else ""
            raise ArchError(f"{where}.{key}{hint}: an option megapgs's towers do not implement")
        if key in TOP_LEVEL_DEFAULTS and value != TOP_LEVEL_DEFAULTS[key]:
            raise _refuse(f"{where}.{key}", value, TOP_LEVEL_DEFAULTS[key])
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_cfg:
            raise ArchError(f"{where}.{key}: missing")
    embed_dim = model_cfg["embed_dim"]
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0:
        raise ArchError(f"{where}.embed_dim = {json.dumps(embed_dim)}: expected a positive integer")
    return {"embed_dim": embed_dim,
            "vision_cfg": _tower_structure("vision_cfg", model_cfg["vision_cfg"], CLIPVisionCfg, where),
            "text_cfg": _tower_structure("text_cfg", model_cfg["text_cfg"], CLIPTextCfg, where)}


def spec_from_structure(numbers: dict[str, Any], name: str, openclip_name: str | None,
                        where: str = "model_cfg") -> ArchSpec:
    """The ArchSpec of `structure()`'s numbers, or ArchError where megapgs cannot build them."""
    vision, text = numbers["vision_cfg"], numbers["text_cfg"]
    if vision["image_size"] % vision["patch_size"]:
        raise ArchError(f"{where}.vision_cfg.image_size = {vision['image_size']}: not a multiple of "
                        f"vision_cfg.patch_size = {vision['patch_size']} (the patches must tile the image)")
    if vision["width"] % vision["head_width"]:
        raise ArchError(f"{where}.vision_cfg.width = {vision['width']}: not a multiple of "
                        f"vision_cfg.head_width = {vision['head_width']}")
    if text["width"] % text["heads"]:
        raise ArchError(f"{where}.text_cfg.width = {text['width']}: not a multiple of text_cfg.heads = {text['heads']}")
    if text["vocab_size"] < TOKENIZER_VOCAB:
        raise ArchError(f"{where}.text_cfg.vocab_size = {text['vocab_size']}: megapgs tokenizes with OpenCLIP's "
                        f"BPE, whose {TOKENIZER_VOCAB} token ids the embedding must hold")
    if text["context_length"] < 2:
        raise ArchError(f"{where}.text_cfg.context_length = {text['context_length']}: a caption needs SOT and EOT")
    return ArchSpec(name, numbers["embed_dim"], VisionSpec(**vision), TextSpec(**text), openclip_name)


@functools.lru_cache(maxsize=1)
def _bundled() -> tuple[dict[str, ArchSpec], dict[str, str]]:
    """({name: spec} of OpenCLIP's bundled configs megapgs computes, {name: why not} of the others)."""
    import open_clip

    specs, refused = {}, {}
    for name in open_clip.list_models():
        where = f"OpenCLIP's {name} config: model_cfg"
        try:
            specs[name] = spec_from_structure(structure(open_clip.get_model_config(name), where), name, name, where)
        except ArchError as err:
            refused[name] = str(err)
    return specs, refused


def openclip_specs() -> dict[str, ArchSpec]:
    """{name: ArchSpec} of every OpenCLIP model config (bundled with open_clip) megapgs computes."""
    return dict(_bundled()[0])


def openclip_arch(name: str) -> ArchSpec | None:
    """The ArchSpec of OpenCLIP's config `name`; None when OpenCLIP has no such name; ArchError
    naming the option when megapgs does not compute it."""
    specs, refused = _bundled()
    if name in refused:
        raise ArchError(refused[name])
    return specs.get(name)


def arch_for(model_cfg: Any, name: str, where: str = "model_cfg") -> ArchSpec:
    """The ArchSpec of an OpenCLIP model config: a megapgs or OpenCLIP name with exactly these towers
    when one has them (own names first), else a custom spec called `name`."""
    custom = spec_from_structure(structure(model_cfg, where), name, None, where)
    for spec in [*OWN_ARCHS.values(), *openclip_specs().values()]:
        if spec.numbers() == custom.numbers():
            return spec
    return custom


def arch_from_file(path: str) -> ArchSpec:
    """The ArchSpec of a model-config JSON: OpenCLIP's form, or an open_clip_config.json (its
    "model_cfg"). Named by the path as given, which is what model.arch holds."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ArchError(f"{path}: cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise ArchError(f"{path}: not valid JSON ({err})") from None
    if isinstance(config, dict) and "model_cfg" in config:  # an OpenCLIP model directory's config
        config = config["model_cfg"]
    where = f"{path}: model_cfg"
    return spec_from_structure(structure(config, where), path, None, where)
