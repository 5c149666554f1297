"""OpenCLIP weights -> a megapgs initial checkpoint, and the reader behind `train.init_from`.

    python tools/convert_from_openclip.py local-dir:OPENCLIP_DIR OUT
    python tools/convert_from_openclip.py ViT-B-16 OUT --pretrained ViT-B-16.safetensors
    python pretrain.py --config configs/vitb16_pgs03.json --set train.init_from=OUT

An OpenCLIP model is a directory (`open_clip_config.json` beside `open_clip_model.safetensors` or
`open_clip_pytorch_model.bin`), or an OpenCLIP architecture name plus a state-dict file. Its config
becomes a megapgs ArchSpec (a megapgs or OpenCLIP name with the same towers, else a custom one named
by the config file), or is refused with the option megapgs's towers do not implement (QuickGELU,
attentional pooling, a timm or Hugging Face tower, ...: decided in megapgs/models/openclip_cfg.py,
which `model.arch` uses too; other normalisation constants are refused here): weights never go into
a model that computes a different function.
An architecture name is taken at its word: OpenAI-trained weights use QuickGELU, which OpenCLIP
names `<arch>-quickgelu`, and megapgs refuses. Files are read without running code (safetensors,
or `torch.load(weights_only=True)`); TorchScript archives are refused; nothing is downloaded.

The initial checkpoint is a directory; the JSON is written last and marks it complete:

    OUT/model.safetensors     megapgs key names and shapes (logit_scale/logit_bias of shape (1,)), fp32
    OUT/megapgs_init.json     format, arch, model_cfg (the towers, OpenCLIP's form), has_logit_bias,
                              source, megapgs version and commit
"""
from __future__ import annotations

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
from megapgs.models.archs import ArchError, ArchSpec, get_arch, init_mismatch
from megapgs.models.clip import CLIP

INIT_JSON = "megapgs_init.json"
INIT_WEIGHTS = "model.safetensors"
FORMAT, FORMAT_VERSION = "megapgs-init-weights", 1
LOCAL_DIR = "local-dir:"
# The weights files of an OpenCLIP model directory, in OpenCLIP's order of preference.
DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
               "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")

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


def arch_for(model_cfg: dict, preprocess_cfg: dict | None = None, origin: str = "", name: str = "custom") -> ArchSpec:
    """The megapgs ArchSpec of `model_cfg` (a megapgs or OpenCLIP name with the same towers, else a
    custom spec called `name`), or ConversionError naming the first option megapgs's towers do not
    implement (`origin` prefixes the option's path)."""
    from megapgs.models.openclip_cfg import arch_for as spec_of

    try:
        spec = spec_of(model_cfg, name, where=f"{origin}model_cfg")
    except ArchError as err:
        raise ConversionError(str(err)) from None
    if preprocess_cfg:
        _check_preprocess(preprocess_cfg, spec.vision.image_size, f"{origin}preprocess_cfg")
    return spec


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
        spec = arch_for(config["model_cfg"], config.get("preprocess_cfg"), origin=f"{config_file}: ",
                        name=str(config_file))
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
        spec = arch_for(model_cfg, origin=f"OpenCLIP's {name} config: ", name=name)
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


def write_init_checkpoint(out: Path, arch: str | ArchSpec, state: dict[str, torch.Tensor],
                          source: dict[str, Any]) -> list[Path]:
    """Write the initial checkpoint directory (see the module doc); returns the files written."""
    from safetensors.torch import save_file

    spec = get_arch(arch)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / INIT_JSON).is_file())):
        raise ConversionError(f"{out} exists and is not a megapgs initial checkpoint; choose a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": spec.name,
            "model_cfg": openclip_model_cfg(spec), "weights": INIT_WEIGHTS, "has_logit_bias": "logit_bias" in state,
            "dtype": "float32", "tensors": len(state),
            "parameters": sum(value.numel() for value in state.values()), "source": source,
            "megapgs": _megapgs_provenance(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / INIT_JSON).unlink(missing_ok=True)  # an overwritten checkpoint is incomplete until its JSON is back
    write_atomically(out / INIT_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    write_atomically(out / INIT_JSON, lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n"))
    return [out / INIT_WEIGHTS, out / INIT_JSON]


def _read_init_json(path: Path) -> tuple[dict[str, Any], ArchSpec]:
    """(the metadata, the ArchSpec) of an initial checkpoint: from its model_cfg (named by its arch),
    or, for a file written before the towers were recorded, from the arch name alone."""
    from megapgs.models.openclip_cfg import arch_for as spec_of

    meta = json.loads((path / INIT_JSON).read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ConversionError(f"{path / INIT_JSON}: format {meta.get('format')!r} version "
                              f"{meta.get('format_version')!r}; this megapgs reads {FORMAT!r} "
                              f"version {FORMAT_VERSION}")
    try:
        if "model_cfg" in meta:
            return meta, spec_of(meta["model_cfg"], meta["arch"], where=f"{path / INIT_JSON}: model_cfg")
        return meta, get_arch(meta["arch"])
    except ArchError as err:
        raise ConversionError(str(err)) from None


def init_arch(path: str | Path) -> ArchSpec:
    """The ArchSpec of an initial checkpoint, or of a megapgs run or checkpoint directory, from its
    metadata alone (no weights are read)."""
    from megapgs.convert.checkpoint import resolve_checkpoint
    from megapgs.train.checkpoint import COMPLETE

    path = Path(path)
    if (path / INIT_JSON).is_file():
        return _read_init_json(path)[1]
    checkpoint = _resolve(path, resolve_checkpoint)
    return _run_arch(json.loads((checkpoint / COMPLETE).read_text())["config"], checkpoint)


def _resolve(path: Path, resolve_checkpoint) -> Path:
    try:
        return resolve_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: neither a megapgs initial checkpoint (a directory with {INIT_JSON}; "
                                "tools/convert_from_openclip.py writes one) nor a megapgs run or checkpoint "
                                "directory") from None


def _run_arch(config: dict[str, Any], where: Path) -> ArchSpec:
    arch = config["model"]["arch"]
    try:
        return get_arch(arch)
    except ArchError as err:
        raise ConversionError(f"{where}: the run's model.arch {arch!r}: {err}") from None


def load_init_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], ArchSpec]:
    """(megapgs state dict, its ArchSpec) of an initial checkpoint directory, or of a megapgs run or
    checkpoint directory (fp32, any ZeRO stage). Reads safetensors or weights-only files only."""
    path = Path(path)
    if (path / INIT_JSON).is_file():
        from safetensors.torch import load_file

        meta, spec = _read_init_json(path)
        return load_file(path / meta["weights"]), spec
    from megapgs.convert.checkpoint import read_checkpoint

    spec = init_arch(path)
    state, _ = read_checkpoint(path)
    return state, spec


def init_fit_error(weights: ArchSpec, model: ArchSpec) -> str | None:
    """None when weights of arch `weights` can initialise a model of arch `model` (the same towers; at
    another image size the positional embeddings are interpolated), else why not: the words that
    follow "train.init_from=... " in the run's message."""
    differ = init_mismatch(weights, model)
    if not differ:
        return None
    return (f"holds {weights.name} weights but model.arch is {model.name!r}; they must be equal: the towers differ "
            f"in {', '.join(differ)} (only the image size may differ; the positional embeddings are then "
            "interpolated)")
