"""OpenCLIP weights -> a megapgs initial checkpoint, and the reader behind `train.init_from`.

    python tools/convert_from_openclip.py local-dir:OPENCLIP_DIR OUT
    python tools/convert_from_openclip.py ViT-B-16 OUT --pretrained ViT-B-16.safetensors
    python pretrain.py --config configs/vitb16_pgs03.json --set train.init_from=OUT

An OpenCLIP model is a directory (`open_clip_config.json` beside `open_clip_model.safetensors` or
`open_clip_pytorch_model.bin`), or an OpenCLIP architecture name plus a state-dict file. Its config
maps to the one megapgs ArchSpec with the same towers, or is refused with the option megapgs's
towers do not implement (QuickGELU, attentional pooling, a timm or Hugging Face tower, other
normalisation constants, ...): weights never go into a model that computes a different function.
An architecture name is taken at its word: OpenAI-trained weights use QuickGELU, which OpenCLIP
names `<arch>-quickgelu`, and megapgs refuses. Files are read without running code (safetensors,
or `torch.load(weights_only=True)`); TorchScript archives are refused; nothing is downloaded.

The initial checkpoint is a directory; the JSON is written last and marks it complete:

    OUT/model.safetensors     megapgs key names and shapes (logit_scale/logit_bias of shape (1,)), fp32
    OUT/megapgs_init.json     format, arch, has_logit_bias, source, megapgs version and commit
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megapgs.atomic import write_atomically
from megapgs.convert.openclip import from_openclip, openclip_model_cfg
from megapgs.models.archs import ARCHS, ArchSpec
from megapgs.models.clip import CLIP

INIT_JSON = "megapgs_init.json"
INIT_WEIGHTS = "model.safetensors"
FORMAT, FORMAT_VERSION = "megapgs-init-weights", 1
LOCAL_DIR = "local-dir:"
# The weights files of an OpenCLIP model directory, in OpenCLIP's order of preference.
DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
               "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")

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


class ConversionError(ValueError):
    """Weights that cannot become megapgs weights; the message names the file or the option."""


@dataclass(frozen=True)
class OpenCLIPWeights:
    spec: ArchSpec
    state: dict[str, torch.Tensor]  # OpenCLIP's key names and shapes, as stored
    model: str                      # what open_clip.create_model takes: "local-dir:DIR" or an arch name
    weights_file: Path
    has_logit_bias: bool

    def describe(self) -> dict[str, Any]:
        import open_clip

        dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in self.state.values()})
        return {"openclip_model": self.model, "weights_file": str(self.weights_file), "dtypes": dtypes,
                "open_clip_version": open_clip.__version__}


# ----------------------------------------------------------------------------- OpenCLIP config -> ArchSpec

def _refuse(where: str, value: Any, default: Any) -> ConversionError:
    key = where.rsplit(".", 1)[-1]
    hint = f" ({HINTS[key]})" if key in HINTS else ""
    return ConversionError(f"{where} = {json.dumps(value)}{hint}: megapgs implements only OpenCLIP's default "
                           f"({json.dumps(default)}); these weights would compute a different function")


def _tower_structure(section: str, given: dict, cfg_class: type, where: str) -> dict[str, Any]:
    """The tower's architecture numbers; any other option that differs from OpenCLIP's default is refused."""
    if not isinstance(given, dict):
        raise ConversionError(f"{where}.{section}: expected an object, got {json.dumps(given)}")
    defaults = {field.name: field.default for field in dataclasses.fields(cfg_class)}
    for key, value in given.items():
        if key not in defaults:
            raise ConversionError(f"{where}.{section}.{key}: not an option of OpenCLIP's {cfg_class.__name__}")
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
                raise ConversionError(f"{where}.vision_cfg.image_size = {json.dumps(size)}: megapgs's image "
                                      "tower takes square images")
            structure["image_size"] = size[0]
    return structure


def _structure(model_cfg: dict, where: str) -> dict[str, Any]:
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    known = {"embed_dim", "vision_cfg", "text_cfg", *TOP_LEVEL_DEFAULTS, *NO_EFFECT["model_cfg"]}
    for key, value in model_cfg.items():
        if key not in known:
            hint = f" ({HINTS[key]})" if key in HINTS else ""
            raise ConversionError(f"{where}.{key}{hint}: an option megapgs's towers do not implement")
        if key in TOP_LEVEL_DEFAULTS and value != TOP_LEVEL_DEFAULTS[key]:
            raise _refuse(f"{where}.{key}", value, TOP_LEVEL_DEFAULTS[key])
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_cfg:
            raise ConversionError(f"{where}.{key}: missing")
    return {"embed_dim": model_cfg["embed_dim"],
            "vision_cfg": _tower_structure("vision_cfg", model_cfg["vision_cfg"], CLIPVisionCfg, where),
            "text_cfg": _tower_structure("text_cfg", model_cfg["text_cfg"], CLIPTextCfg, where)}


def _check_preprocess(preprocess: dict, image_size: int, where: str) -> None:
    """megapgs normalises with OpenAI's mean/std after a bicubic resize of the shorter side and a centre crop."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    expected = {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD), "mode": "RGB",
                "interpolation": "bicubic", "resize_mode": "shortest", "size": image_size}
    for key, want in expected.items():
        value = preprocess.get(key)
        if value is None:
            continue
        if key == "size" and isinstance(value, (list, tuple)) and len(set(value)) == 1:
            value = value[0]
        same = (len(value) == len(want) and all(abs(a - b) <= 1e-6 for a, b in zip(value, want, strict=True))
                if key in ("mean", "std") and isinstance(value, (list, tuple)) else value == want)
        if not same:
            raise ConversionError(f"{where}.{key} = {json.dumps(value)}: megapgs's transforms use "
                                  f"{json.dumps(want)}; the weights expect other inputs")


def arch_for(model_cfg: dict, preprocess_cfg: dict | None = None, origin: str = "") -> ArchSpec:
    """The megapgs ArchSpec whose OpenCLIP config is `model_cfg`'s, or ConversionError naming the
    first option that megapgs's towers do not implement (`origin` prefixes the option's path)."""
    where = f"{origin}model_cfg"
    if not isinstance(model_cfg, dict):
        raise ConversionError(f"{where}: expected an object, got {json.dumps(model_cfg)}")
    structure = _structure(model_cfg, where)
    for spec in ARCHS.values():
        if _structure(openclip_model_cfg(spec), "megapgs") == structure:
            if preprocess_cfg:
                _check_preprocess(preprocess_cfg, spec.vision.image_size, f"{origin}preprocess_cfg")
            return spec
    raise ConversionError(f"{where}: no megapgs architecture has these towers ({json.dumps(structure)}); "
                          f"megapgs has {', '.join(ARCHS)} (megapgs/models/archs.py)")


# ----------------------------------------------------------------------------- reading weights files

def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch.save file, read without running code. An
    OpenCLIP training checkpoint ({"state_dict": {"module.<key>": ...}, ...}) gives its weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix in (".npz", ".npy"):
        raise ConversionError(f"{path}: big_vision (numpy) weights are not supported; use an OpenCLIP state dict")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            loaded: Any = load_file(path)
        except SafetensorError as err:
            raise ConversionError(f"{path}: not a readable safetensors file ({err})") from None
    else:
        if _is_torchscript(path):
            raise ConversionError(f"{path} is a TorchScript archive (OpenAI's original CLIP files are): loading "
                                  "one runs its code, so megapgs refuses it; OpenAI's weights also use QuickGELU, "
                                  "which megapgs's towers do not implement")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            detail = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
            raise ConversionError(f"{path} holds pickled objects that are not tensors; megapgs reads .pt/.bin files "
                                  "only with torch.load(weights_only=True), which runs no code"
                                  + (f" ({detail[0]})" if detail else "")) from None
        except RuntimeError as err:
            raise ConversionError(f"{path}: not a readable torch.save file ({str(err).splitlines()[0]})") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # an OpenCLIP training checkpoint
    if not isinstance(loaded, dict) or not loaded:
        raise ConversionError(f"{path}: expected a state dict (key -> tensor), found {type(loaded).__name__}")
    if all(isinstance(key, str) and key.startswith("module.") for key in loaded):
        loaded = {key[len("module."):]: value for key, value in loaded.items()}  # saved from a DDP wrapper
    not_tensors = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ConversionError(f"{path}: expected a state dict of tensors; {not_tensors[:3]} are not tensors")
    return loaded


def _model_dir(source: str) -> Path | None:
    if source.startswith(LOCAL_DIR):
        folder = Path(source[len(LOCAL_DIR):])
        if not folder.is_dir():
            raise FileNotFoundError(f"{source}: no such directory")
        return folder
    return Path(source) if Path(source).is_dir() else None


def load_openclip_state(model_name_or_dir: str, pretrained_file: str | Path | None = None) -> OpenCLIPWeights:
    """An OpenCLIP model's weights and the megapgs ArchSpec they fit: from `local-dir:DIR` or DIR (its
    open_clip_config.json and weights), or from an OpenCLIP architecture name and `pretrained_file`."""
    folder = _model_dir(model_name_or_dir)
    if folder is not None:
        if pretrained_file is not None:
            raise ConversionError(f"a weights file goes with an architecture name; the model directory {folder} "
                                  "holds its own weights")
        config_file = folder / "open_clip_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{folder}: no open_clip_config.json (not an OpenCLIP model directory)")
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise ConversionError(f"{config_file}: not valid JSON ({err})") from None
        if not isinstance(config, dict) or "model_cfg" not in config:
            raise ConversionError(f"{config_file}: no model_cfg")
        spec = arch_for(config["model_cfg"], config.get("preprocess_cfg"), origin=f"{config_file}: ")
        found = [folder / name for name in DIR_WEIGHTS if (folder / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{folder}: no weights file (one of {', '.join(DIR_WEIGHTS)})")
        weights_file, model = found[0], f"{LOCAL_DIR}{folder.resolve()}"
        has_logit_bias = config["model_cfg"].get("init_logit_bias") is not None
        state = read_state_dict(weights_file)
    else:
        import open_clip

        name = model_name_or_dir
        if name.startswith("hf-hub:"):
            raise ConversionError(f"{name}: megapgs downloads nothing; fetch the model directory and pass "
                                  "local-dir:DIR")
        model_cfg = open_clip.get_model_config(name)  # the configs bundled with open_clip
        if model_cfg is None:
            raise ConversionError(f"{name!r} is neither a directory nor an OpenCLIP architecture name "
                                  "(open_clip.list_models())")
        if pretrained_file is None:
            raise ConversionError(f"architecture {name} needs its weights file (--pretrained FILE); "
                                  "megapgs downloads nothing")
        spec = arch_for(model_cfg, origin=f"OpenCLIP's {name} config: ")
        weights_file, model = Path(pretrained_file).resolve(), name
        state = read_state_dict(weights_file)
        has_logit_bias = "logit_bias" in state  # e.g. an OpenCLIP run of this architecture with --siglip
    return OpenCLIPWeights(spec, state, model, weights_file, has_logit_bias)


def megapgs_state(weights: OpenCLIPWeights) -> dict[str, torch.Tensor]:
    """The weights under megapgs's key names and shapes (checked key by key), as fp32."""
    with torch.device("meta"):  # the keys and shapes, without allocating a model
        template = CLIP(weights.spec, init_logit_bias=0.0 if weights.has_logit_bias else None).state_dict()
    try:
        state = from_openclip(weights.state, template)
    except (KeyError, ValueError) as err:
        raise ConversionError(f"{weights.weights_file}: not the weights of {weights.model} "
                              f"(megapgs {weights.spec.name}): {err.args[0]}") from None
    return {key: (value.float() if value.is_floating_point() else value).contiguous() for key, value in state.items()}


# ----------------------------------------------------------------------------- the initial checkpoint

def _megapgs_provenance() -> dict[str, str | None]:
    import tomllib

    from megapgs.config import REPO_ROOT

    try:
        version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        version = None
    git = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=False)
    return {"version": version, "commit": git.stdout.strip() if git.returncode == 0 else None}


def write_init_checkpoint(out: Path, arch: str, state: dict[str, torch.Tensor], source: dict[str, Any]) -> list[Path]:
    """Write the initial checkpoint directory (see the module doc); returns the files written."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / INIT_JSON).is_file())):
        raise ConversionError(f"{out} exists and is not a megapgs initial checkpoint; choose a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": arch, "weights": INIT_WEIGHTS,
            "has_logit_bias": "logit_bias" in state, "dtype": "float32", "tensors": len(state),
            "parameters": sum(value.numel() for value in state.values()), "source": source,
            "megapgs": _megapgs_provenance(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / INIT_JSON).unlink(missing_ok=True)  # an overwritten checkpoint is incomplete until its JSON is back
    write_atomically(out / INIT_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    write_atomically(out / INIT_JSON, lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n"))
    return [out / INIT_WEIGHTS, out / INIT_JSON]


def load_init_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(megapgs state dict, arch name) of an initial checkpoint directory, or of a megapgs run or
    checkpoint directory (fp32, any ZeRO stage). Reads safetensors or weights-only files only."""
    path = Path(path)
    if (path / INIT_JSON).is_file():
        from safetensors.torch import load_file

        meta = json.loads((path / INIT_JSON).read_text())
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ConversionError(f"{path / INIT_JSON}: format {meta.get('format')!r} version "
                                  f"{meta.get('format_version')!r}; this megapgs reads {FORMAT!r} "
                                  f"version {FORMAT_VERSION}")
        return load_file(path / meta["weights"]), meta["arch"]
    from megapgs.convert.checkpoint import read_checkpoint, resolve_checkpoint

    try:
        resolve_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: neither a megapgs initial checkpoint (a directory with {INIT_JSON}; "
                                "tools/convert_from_openclip.py writes one) nor a megapgs run or checkpoint "
                                "directory") from None
    state, config = read_checkpoint(path)
    return state, config["model"]["arch"]
