"""Convert a megapgs training checkpoint (any ZeRO stage, any number of ranks) to OpenCLIP.

    python tools/convert_to_openclip.py runs/tiny_cpu OUT_DIR
    python tools/convert_to_openclip.py runs/vitl/checkpoints/step_00390625 OUT_DIR

OUT_DIR gets an OpenCLIP model directory (`open_clip_config.json`, `open_clip_model.safetensors`)
that `open_clip.create_model_and_transforms("local-dir:OUT_DIR")` and
`clip_benchmark eval --model local-dir:OUT_DIR --pretrained ""` load without network; for an
OpenCLIP architecture (ViT-B-16, ViT-L-14, ...) also `<arch>.pt` and `<arch>.safetensors` state
dicts for `--model <arch> --pretrained OUT_DIR/<arch>.pt`. Afterwards it loads the directory with
open_clip and compares image and text embeddings with megapgs's own: a mismatch is an error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from megapgs.convert.checkpoint import read_checkpoint, resolve_checkpoint  # noqa: E402
from megapgs.convert.openclip import build_openclip_model, openclip_model_cfg, to_openclip  # noqa: E402
from megapgs.models.archs import get_arch  # noqa: E402
from megapgs.models.clip import CLIP  # noqa: E402

PARITY_TOLERANCE = 1e-5
CHECK_CAPTIONS = ["a photo of a cat.", "a black and white photo of a coat.", "an image", "two dogs on a beach at night."]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def write_model_dir(out: Path, spec, openclip_state: dict[str, torch.Tensor]) -> list[Path]:
    import open_clip

    out.mkdir(parents=True, exist_ok=True)
    model_cfg = open_clip.get_model_config(spec.openclip_name) if spec.openclip_name else openclip_model_cfg(spec)
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
                                 "interpolation": "bicubic", "resize_mode": "shortest"}}
    tensors = {key: value.contiguous() for key, value in openclip_state.items()}
    written = [out / "open_clip_config.json", out / "open_clip_model.safetensors"]
    written[0].write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(written[1]))
    if spec.openclip_name:
        written += [out / f"{spec.openclip_name}.pt", out / f"{spec.openclip_name}.safetensors"]
        torch.save(tensors, written[2])
        save_file(tensors, str(written[3]))
    return written


@torch.no_grad()
def check_parity(out: Path, ours: CLIP, spec) -> tuple[float, float]:
    """Load OUT as OpenCLIP would and compare embeddings with megapgs's model (unmasked)."""
    import open_clip

    from megapgs.data.tokenizer import Tokenizer

    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    theirs.eval()
    size = spec.vision.image_size
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens, lengths = Tokenizer(spec.name)(CHECK_CAPTIONS)
    image_err = rel_err(theirs.encode_image(images, normalize=True), ours.encode_image(images))
    text_err = rel_err(theirs.encode_text(tokens, normalize=True), ours.encode_text(tokens, lengths))
    return image_err, text_err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a run directory, its checkpoints/ or one step_* directory")
    parser.add_argument("out", type=Path, help="output directory (an OpenCLIP model directory)")
    args = parser.parse_args(argv)
    try:
        path = resolve_checkpoint(args.checkpoint)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    state, config = read_checkpoint(path)
    spec = get_arch(config["model"]["arch"])
    if config.get("train", {}).get("loss") == "siglip":
        print("error: SigLIP checkpoints need OpenCLIP's CustomTextCLIP layout; not supported yet", file=sys.stderr)
        return 2
    ours = CLIP(spec).eval()
    ours.load_state_dict(state)
    openclip_state = to_openclip({k: v.detach() for k, v in ours.state_dict().items()},
                                 build_openclip_model(spec).state_dict())
    written = write_model_dir(args.out, spec, openclip_state)
    image_err, text_err = check_parity(args.out, ours, spec)
    for file in written:
        print(f"wrote {file} ({file.stat().st_size / 1e6:.1f} MB)")
    line = (f"parity: {spec.name} from {path}: image embeddings rel. error {image_err:.2e}, "
            f"text {text_err:.2e} (limit {PARITY_TOLERANCE:g})")
    if max(image_err, text_err) > PARITY_TOLERANCE:
        print(f"error: {line}", file=sys.stderr)
        return 1
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
