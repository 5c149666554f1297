"""The one configuration schema of a megapgs run.

Every option lives here with a type, a default and a one-line description. A run's JSON file
(configs/*.json) and its `--set key.path=value` overrides are validated once, at start-up, in
strict JSON mode: an unknown key, a value of the wrong type or out of range stops the run with
one message that names each offending key path and what is allowed. The validated `Config` is
frozen; components read their own section and never change it.

    python -m megapgs.config --explain      # every option with its default
"""
from __future__ import annotations

import copy
import difflib
import json
import sys
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from megapgs.models.archs import OWN_ARCHS, ArchError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny_cpu.json"

ATTENTION_BACKENDS = ("auto", "torch_varlen", "flash_attn", "xformers", "flex", "sdpa_padded", "reference")
# Keys of the DeepSpeed JSON that megapgs sets itself from train.* and optim.*, so that each
# number has one home.
DEEPSPEED_KEYS_SET_BY_MEGAPGS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (train.micro_batch_size x ranks)",
    "optimizer": "optim.*",
    "scheduler": "optim.*",
}


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every offending key path."""


class FieldProblem(ValueError):
    """Raised by a cross-field check to blame one key of the section being validated."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)


class ModelConfig(_Section):
    arch: str = Field("tiny-28", description=f"the towers: {', '.join(OWN_ARCHS)}, an OpenCLIP model-config name "
                                             "(listed below), or the path of an OpenCLIP model-config JSON")
    attention: Literal[ATTENTION_BACKENDS] = Field(  # type: ignore[valid-type]
        "auto", description="attention back-end; auto picks the fastest available on the device")
    grad_checkpointing: bool = Field(False, description="recompute each block's activations in backward")
    compile: bool = Field(False, description="torch.compile the towers")
    partitioned_init: bool = Field(True, description="ZeRO-3: build the model partitioned (deepspeed.zero.Init), "
                                   "so no rank holds it whole; false builds it whole on every rank first")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        from megapgs.models.archs import get_arch  # OpenCLIP's names and files import open_clip

        try:
            get_arch(arch)
        except ArchError as err:
            raise ValueError(str(err)) from None
        return arch


class PGSConfig(_Section):
    masking: Literal["none", "random", "pgs"] = Field(
        "pgs", description="image-token masking in training: none, random (FLIP-style) or pgs")
    candidate_ratio: float = Field(0.05, gt=0, lt=1, description="share c of patches drawn as candidates")
    candidate_policy: Literal["paper", "reference"] = Field(
        "paper", description="paper: flattest patches are candidates; reference: uniform draw (released code)")
    use_edges: bool = Field(True, description="rank candidates by the Sobel edge map of the image")
    edge_weight: float = Field(1e6, ge=0, description="weight beta of the edge score against U(0,1) noise")
    sim_threshold: float = Field(0.5, description="mask patches whose similarity to a candidate exceeds tau")
    use_ot: bool = Field(True, description="balance the similarity by optimal transport")
    ot: Literal["entropic", "reference"] = Field(
        "entropic", description="entropic: log-domain Sinkhorn plan; reference: row/column normalisation")
    ot_reg: float = Field(0.05, gt=0, description="entropic regularisation epsilon of the OT plan")
    ot_iters: int = Field(50, ge=1, description="fixed Sinkhorn iteration count (no convergence sync)")
    min_mask_ratio: float = Field(0.3, ge=0, lt=1, description="r_min: each image drops at least this share")
    min_keep_ratio: float = Field(0.1, gt=0, le=1, description="each image keeps at least this share")
    embed_sim_schedule: Literal["progress", "pixels", "tokens"] = Field(
        "progress", description="token-similarity weight w: training progress, 0 (pixels) or 1 (tokens)")
    pack: bool = Field(True, description="pack each image's own k_i tokens; false: batch-uniform k = min k_i")
    rng: Literal["rank", "sample"] = Field(
        "rank", description="masks drawn per (seed, step, rank), or per global sample: rank-count invariant")
    unmasked_tail: float = Field(
        0.0, ge=0, lt=1, description="share of the last training steps run unmasked (FLIP's unmasked tuning)")
    packed_length: Literal["auto", "static", "exact"] = Field(
        "auto", description="static: a fixed token budget B(k_max+1) + padding, no host sync, one compiled "
                            "shape; exact: sum(k_i+1) tokens, counts read from the device (a sync); auto: "
                            "static on CUDA, exact on the CPU")

    @model_validator(mode="after")
    def _keep_bounds(self) -> PGSConfig:
        if self.min_keep_ratio > 1 - self.min_mask_ratio:
            raise FieldProblem("min_keep_ratio", f"must be <= 1 - min_mask_ratio = {1 - self.min_mask_ratio:g} "
                            f"(got {self.min_keep_ratio:g}); the keep count would exceed its cap")
        return self


class DataConfig(_Section):
    source: Literal["fashion_mnist", "webdataset", "synthetic"] = Field(
        "fashion_mnist", description="fashion_mnist: the embedded default; webdataset: your shards")
    root: str = Field("data", description="where prepared data (the Fashion-MNIST shards) is cached")
    fashion_mnist_dir: str = Field(
        "/usr/share/datasets/fashion-mnist", description="Fashion-MNIST idx files (Debian: dataset-fashion-mnist)")
    train_shards: str | None = Field(
        None, description="training shards: a brace pattern of .tar files or a manifest .json")
    loader: Literal["auto", "wds", "dali", "nvjpeg"] = Field(
        "auto", description="auto: DALI on GPU when installed, else webdataset+PIL")
    workers: int = Field(2, ge=0, description="loader worker processes per rank")
    timeout_s: float = Field(600.0, gt=0, description="seconds to wait for a batch from the loader workers, then stop")
    shuffle_buffer: int = Field(1000, ge=0, description="samples in the shuffle buffer (0: no shuffle)")
    resampled: bool = Field(False, description="draw shards with replacement per rank (multi-node)")
    samples_per_epoch: int | None = Field(
        None, gt=0, description="epoch size; read from the shard manifest when unset")
    augment: bool = Field(True, description="random resized crop in training (OpenCLIP's train transform)")
    crop_scale: tuple[float, float] = Field((0.9, 1.0), description="area range of the random resized crop")
    shard_size: int = Field(5000, ge=1, description="samples per shard when megapgs writes shards")
    index_dir: str | None = Field(
        None, description="where a run indexes shards given without a manifest (default: beside the shards, "
                          "else in the run's folder); better: tools/index_shards.py once")
    dali_window_shards: int = Field(
        64, ge=1, description="shards one DALI reader holds at a time (host memory: about 300 bytes a sample)")

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError("need 0 < low <= high <= 1")
        return scale

    @model_validator(mode="after")
    def _shards_given(self) -> DataConfig:
        if self.source == "webdataset" and not self.train_shards:
            raise FieldProblem("train_shards", "required when data.source is 'webdataset': "
                               "a brace pattern of .tar shards or a manifest .json")
        return self


class OptimConfig(_Section):
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.2, ge=0, description="AdamW weight decay (off for norms, biases, embeddings)")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas")
    eps: float = Field(1e-6, gt=0, description="AdamW epsilon")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="learning rate after warmup")
    warmup_steps: int = Field(100, ge=0, description="linear warmup from 0 to lr")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a share of lr")

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError("each beta must be in [0, 1)")
        return betas


class TrainConfig(_Section):
    output_dir: str = Field("runs/tiny_cpu", description="run directory: logs, resolved config, checkpoints")
    global_batch_size: int = Field(256, ge=1, description="samples per optimizer step over all ranks")
    micro_batch_size: int = Field(256, ge=1, description="samples per rank per forward pass")
    steps: int | None = Field(1000, ge=1, description="optimizer steps to run (null when epochs is set)")
    epochs: float | None = Field(None, gt=0, description="epochs to run instead of steps")
    seed: int = Field(0, ge=0, description="seed of every random draw (masks, shuffles, init)")
    loss: Literal["clip", "siglip"] = Field("clip", description="contrastive InfoNCE or SigLIP sigmoid loss")
    local_loss: bool = Field(False, description="each rank scores its own rows against all columns")
    gather_with_grad: bool = Field(False, description="gather features across ranks with gradient")
    contrastive_batch: Literal["global", "micro_batch"] = Field(
        "global", description="global: the loss sees the whole global batch whatever the accumulation (feature "
                              "caching, one extra forward per micro-batch); micro_batch: each micro-batch's "
                              "ranks x micro_batch_size pairs alone")
    resume: str = Field("none", description="none, auto (newest complete checkpoint) or a checkpoint path")
    init_from: str | None = Field(
        None, description="initial weights: a tools/convert_from_openclip.py output or a megapgs run/checkpoint "
                          "directory with model.arch's towers (at another image size the positional embeddings "
                          "are interpolated); not read when train.resume finds a checkpoint")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (0: only at the end)")
    keep_last: int = Field(3, ge=1, description="checkpoints kept on disk")

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_default_steps(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("epochs") is not None and "steps" not in data:
            data = {**data, "steps": None}
        return data

    @model_validator(mode="after")
    def _duration(self) -> TrainConfig:
        if (self.steps is None) == (self.epochs is None):
            raise FieldProblem("steps", "set exactly one of train.steps and train.epochs (the other null)")
        if self.global_batch_size % self.micro_batch_size:
            raise FieldProblem("global_batch_size", f"must be a multiple of train.micro_batch_size "
                            f"= {self.micro_batch_size} (got {self.global_batch_size})")
        if self.local_loss and not self.gather_with_grad:
            raise FieldProblem("local_loss", "needs train.gather_with_grad: true (without it the gradient "
                               "misses the other ranks' rows)")
        return self


class EvalConfig(_Section):
    every_steps: int = Field(0, ge=0, description="steps between evaluations (0: only at the end)")
    zeroshot: bool = Field(True, description="zero-shot classification on the held-out shards")
    retrieval: bool = Field(True, description="image<->text retrieval R@1/5/10 on the held-out shards")
    shards: str | None = Field(
        None, description="held-out shards in clip_benchmark's wds layout (Fashion-MNIST: its test split)")
    batch_size: int = Field(512, ge=1, description="images per evaluation batch")
    max_samples: int | None = Field(None, ge=1, description="evaluate on the first this many samples of the set")
    workers: int = Field(0, ge=0, description="processes per rank decoding held-out images (0: the training "
                         "process); the ranks share the set")


class LogConfig(_Section):
    every_steps: int = Field(10, ge=1, description="steps between metric reductions and log lines")
    tensorboard: bool = Field(True, description="write TensorBoard events under the run directory")
    jsonl: bool = Field(True, description="write metrics.jsonl under the run directory")
    progress: bool = Field(True, description="progress bar on rank 0")
    level: Literal["debug", "info", "warning"] = Field("info", description="log level")


DEFAULT_DEEPSPEED: dict[str, Any] = {"zero_optimization": {"stage": 0}, "gradient_clipping": 1.0}


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="the CLIP towers")
    pgs: PGSConfig = Field(default_factory=PGSConfig, description="patch selection (PGS.md)")
    data: DataConfig = Field(default_factory=DataConfig, description="shards and loaders")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="AdamW and the lr schedule")
    deepspeed: dict[str, Any] = Field(
        default_factory=lambda: copy.deepcopy(DEFAULT_DEEPSPEED),
        description="the DeepSpeed JSON (ZeRO stage, bf16/fp16, clipping), embedded or a path to a .json")
    train: TrainConfig = Field(default_factory=TrainConfig, description="steps, batch, loss, checkpoints")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="in-training evaluation")
    log: LogConfig = Field(default_factory=LogConfig, description="metrics and progress")

    @field_validator("deepspeed", mode="before")
    @classmethod
    def _load_deepspeed(cls, value: Any) -> Any:
        if isinstance(value, str):  # a path to a DeepSpeed JSON file
            path = Path(value)
            if not path.is_file():
                raise ValueError("no DeepSpeed JSON file at this path")
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{value!r} is not valid JSON: {err}") from None
        return value

    @field_validator("deepspeed")
    @classmethod
    def _check_deepspeed(cls, ds: dict[str, Any]) -> dict[str, Any]:
        for key, home in DEEPSPEED_KEYS_SET_BY_MEGAPGS.items():
            if key in ds:
                raise FieldProblem(key, f"is set by megapgs from {home}; remove it from the DeepSpeed JSON")
        zero = ds.get("zero_optimization", {})
        if not isinstance(zero, dict):
            raise FieldProblem("zero_optimization", f"must be an object (got {json.dumps(zero)})")
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig  # DeepSpeed's own schema

        try:
            DeepSpeedZeroConfig(**zero)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(["zero_optimization", *map(str, err["loc"])])
            raise FieldProblem(where, f"{err['msg']} (got {json.dumps(err.get('input'), default=str)})") from None
        if all(ds.get(p, {}).get("enabled") for p in ("bf16", "fp16")):
            raise FieldProblem("bf16", "bf16 and fp16 cannot both be enabled")
        accum = ds.get("data_types", {}).get("grad_accum_dtype", "fp32")
        if ds.get("bf16", {}).get("enabled") and zero.get("stage", 0) == 0 and accum in ("fp32", "float32"):
            raise FieldProblem("zero_optimization.stage", "bf16 training accumulates gradients in fp32, which "
                               "DeepSpeed does under ZeRO stage 1, 2 or 3 only: use stage >= 1 (or accept bf16 "
                               "accumulation with data_types.grad_accum_dtype: bf16)")
        return ds

    @model_validator(mode="after")
    def _cross_sections(self) -> Config:
        if self.data.source != "fashion_mnist" and (self.eval.zeroshot or self.eval.retrieval) and not self.eval.shards:
            raise FieldProblem("eval.shards", f"required to evaluate a {self.data.source} run "
                               "(or set eval.zeroshot and eval.retrieval to false)")
        return self

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))

    @property
    def precision(self) -> str:
        for name in ("bf16", "fp16"):
            if self.deepspeed.get(name, {}).get("enabled"):
                return name
        return "fp32"


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig, "pgs": PGSConfig, "data": DataConfig, "optim": OptimConfig,
    "train": TrainConfig, "eval": EvalConfig, "log": LogConfig,
}


# ----------------------------------------------------------------------------- loading

def _format_error(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldProblem):
        return f"{'.'.join(loc + cause.key.split('.'))}: {cause}"
    path = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        schema = SECTIONS.get(loc[0], Config) if len(loc) > 1 else Config
        allowed = list(schema.model_fields)
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{path}: unknown key{hint}; allowed: {', '.join(allowed)}"
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and err["type"] not in ("missing",):
        msg += f" (got {json.dumps(err['input'], default=str)})"
    return f"{path}: {msg}"


def validate(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate a raw config dict (as read from JSON) into a frozen Config, or raise ConfigError."""
    try:
        return Config.model_validate_json(json.dumps(raw))
    except ValidationError as exc:
        lines = [_format_error(e) for e in exc.errors()]
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(lines)) from None


def _field_type(path: Sequence[str]) -> Any:
    """The annotation of the schema field at `path`, or None when there is no such field."""
    schema: Any = Config
    for key in path:
        field = getattr(schema, "model_fields", {}).get(key)
        if field is None:
            return None
        schema = field.annotation
    return schema


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `key.path=value` override to a raw config dict in place.

    The value is parsed as JSON (numbers, true/false, null, lists, objects) unless the target
    field takes a string, in which case the text is kept as it is.
    """
    key_path, sep, text = assignment.partition("=")
    keys = key_path.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"--set {assignment!r}: expected key.path=value, e.g. optim.lr=5e-4")
    field = _field_type(keys)
    if field == str | None and text == "null":  # an optional string cleared
        value: Any = None
    elif field in (str, str | None):  # strings as they are
        value = text
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {'.'.join(keys[:depth + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a JSON object at the top level")
    return raw


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a config JSON (the embedded default when `path` is None), apply overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    raw = read_json(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate(raw, source=f"config {path}" + (" with --set overrides" if overrides else ""))


# ----------------------------------------------------------------------------- --explain

def _type_name(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if typing.get_origin(annotation) is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if args:  # X | None
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    return getattr(annotation, "__name__", str(annotation))


def explain() -> str:
    """Every option: key = default, its description, and its type."""
    lines = []
    for name, field in Config.model_fields.items():
        lines.append(f"\n[{name}]  {field.description}")
        if name == "deepspeed":
            lines.append(f"  deepspeed = {json.dumps(DEFAULT_DEEPSPEED)}")
            lines.append("      any DeepSpeed JSON keys except " + ", ".join(DEEPSPEED_KEYS_SET_BY_MEGAPGS))
            continue
        for key, sub in SECTIONS[name].model_fields.items():
            default = sub.default_factory() if sub.default_factory else sub.default
            lines.append(f"  {name}.{key} = {json.dumps(default)}")
            lines.append(f"      {sub.description}  [{_type_name(sub.annotation)}]")
            if (name, key) == ("model", "arch"):
                lines.extend(explain_archs())
    return "\n".join(lines).lstrip("\n")


def explain_archs() -> list[str]:
    """What model.arch accepts, for --explain: megapgs's own archs and OpenCLIP's computed ones, with
    their numbers (imports open_clip to read its model configs)."""
    from megapgs.models.archs import openclip_arch_names
    from megapgs.models.openclip_cfg import openclip_specs

    specs = {**OWN_ARCHS, **openclip_specs()}
    width = max(map(len, specs))
    lines = ["      megapgs's own:"]
    lines += [f"        {name:<{width}}  {OWN_ARCHS[name].describe()}" for name in OWN_ARCHS]
    lines.append(f"      OpenCLIP's model configs whose towers megapgs computes ({len(openclip_arch_names())}):")
    lines += [f"        {name:<{width}}  {spec.describe()}" for name, spec in openclip_specs().items()]
    lines.append("      or a model-config JSON in OpenCLIP's form ({\"embed_dim\", \"vision_cfg\", \"text_cfg\"}, or "
                 "an open_clip_config.json); an option megapgs does not compute is refused by name")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m megapgs.config", description=__doc__.splitlines()[0])
    parser.add_argument("--explain", action="store_true", help="print every option with its default")
    parser.add_argument("--check", metavar="CONFIG", help="validate a config file and print it resolved")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.explain:
        print(explain())
    if args.check or not args.explain:
        try:
            cfg = load_config(args.check, args.overrides)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
