"""Convert a megapgs training checkpoint (any ZeRO stage, any number of ranks) to OpenCLIP.

    python tools/convert_to_openclip.py runs/tiny_cpu OUT_DIR
    python tools/convert_to_openclip.py runs/vitl/checkpoints/step_00390625 OUT_DIR

OUT_DIR gets an OpenCLIP model directory (`open_clip_config.json`, `open_clip_model.safetensors`)
that `open_clip.create_model_and_transforms("local-dir:OUT_DIR")` and
`clip_benchmark eval --model local-dir:OUT_DIR --pretrained ""` load without network; for an
OpenCLIP architecture (ViT-B-16, ViT-L-14, ...) also `<arch>.pt` and `<arch>.safetensors` state
dicts for `--model <arch> --pretrained OUT_DIR/<arch>.pt`. A SigLIP-trained run (its logit_bias) gives
the model directory only, whose config says `init_logit_bias` (OpenCLIP's built-in names have no
logit_bias, so `--model <arch>` would refuse the state dict). Afterwards it loads the directory with
open_clip and compares image and text embeddings, logit scale and bias with megapgs's own: a
mismatch is an error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import open_clip  # noqa: E402
import torch  # noqa: E402
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from megapgs.atomic import write_atomically  # noqa: E402
from megapgs.convert.checkpoint import clip_from_state, read_checkpoint, resolve_checkpoint  # noqa: E402
from megapgs.convert.openclip import (  # noqa: E402
    SIGLIP_INIT_LOGIT_BIAS, openclip_model_cfg, to_openclip)
from megapgs.convert.parity import compare  # noqa: E402
from megapgs.models.archs import ArchError, get_arch  # noqa: E402
from megapgs.train.safe_load import UnsafeCheckpointError  # noqa: E402


def model_config(spec, siglip: bool) -> dict:
    """open_clip_config.json: OpenCLIP's own config for its named architectures, ours otherwise;
    `init_logit_bias` for a SigLIP-trained model; megapgs's preprocessing."""
    model_cfg = open_clip.get_model_config(spec.openclip_name) if spec.openclip_name else openclip_model_cfg(spec)
    if siglip:
        model_cfg = {**model_cfg, "init_logit_bias": SIGLIP_INIT_LOGIT_BIAS}
    return {"model_cfg": model_cfg,
            "preprocess_cfg": {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
                               "interpolation": "bicubic", "resize_mode": "shortest"}}


def write_model_dir(out: Path, spec, config: dict, openclip_state: dict[str, torch.Tensor]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.contiguous() for key, value in openclip_state.items()}
    written = [out / "open_clip_model.safetensors", out / "open_clip_config.json"]
    write_atomically(written[0], lambda tmp: save_file(tensors, str(tmp)))
    write_atomically(written[1], lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    if spec.openclip_name and "init_logit_bias" not in config["model_cfg"]:
        written += [out / f"{spec.openclip_name}.pt", out / f"{spec.openclip_name}.safetensors"]
        write_atomically(written[2], lambda tmp: torch.save(tensors, tmp))
        write_atomically(written[3], lambda tmp: save_file(tensors, str(tmp)))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a run directory, its checkpoints/ or one step_* directory")
    parser.add_argument("out", type=Path, help="output directory (an OpenCLIP model directory)")
    args = parser.parse_args(argv)
    try:
        path = resolve_checkpoint(args.checkpoint)
        state, config = read_checkpoint(path)
        spec = get_arch(config["model"]["arch"])
    except (FileNotFoundError, UnsafeCheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ArchError as err:
        print(f"error: {path}: the run's model.arch: {err}", file=sys.stderr)
        return 2
    siglip = "logit_bias" in state
    ours = clip_from_state(spec, state)  # the checkpoint's tensors: one copy of the weights in memory
    del state
    config = model_config(spec, siglip)
    with torch.device("meta"):  # OpenCLIP's keys and shapes, without allocating its weights
        template = open_clip.model.CLIP(**config["model_cfg"]).state_dict()
    openclip_state = to_openclip({k: v.detach() for k, v in ours.state_dict().items()}, template)
    written = write_model_dir(args.out, spec, config, openclip_state)
    del openclip_state
    parity = compare(ours, open_clip.create_model(f"local-dir:{args.out}").eval(), spec)
    for file in written:
        print(f"wrote {file} ({file.stat().st_size / 1e6:.1f} MB)")
    line = parity.describe(spec.name, path)
    if not parity.ok:
        print(f"error: {line}", file=sys.stderr)
        return 1
    print(line)
    if siglip and spec.openclip_name:
        print(f"note: a SigLIP-trained {spec.openclip_name}: load it as local-dir:{args.out} (OpenCLIP's built-in "
              f"{spec.openclip_name} has no logit_bias)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
