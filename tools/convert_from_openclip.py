"""Convert OpenCLIP weights to a megapgs initial checkpoint, for `--set train.init_from=OUT`.

    python tools/convert_from_openclip.py local-dir:OPENCLIP_DIR OUT
    python tools/convert_from_openclip.py OPENCLIP_DIR OUT
    python tools/convert_from_openclip.py ViT-L-14 OUT --pretrained ViT-L-14.safetensors   # or a .pt/.bin

SRC is an OpenCLIP model directory (open_clip_config.json and its weights), or an OpenCLIP
architecture name with its state-dict file (safetensors, or a torch.save file read with
weights_only=True; an OpenCLIP training checkpoint's "state_dict" is taken). An architecture or
option that megapgs's towers do not implement is an error, before anything is written. OUT gets
`model.safetensors` (megapgs's key names) and `megapgs_init.json`. Afterwards the tool loads OUT
into megapgs's CLIP and the source into open_clip's, and compares image and text embeddings on
random inputs (fp32, CPU): a mismatch is an error. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from megapgs.convert.checkpoint import clip_from_state  # noqa: E402
from megapgs.convert.init_weights import (  # noqa: E402
    LOCAL_DIR,
    ConversionError,
    OpenCLIPWeights,
    load_init_weights,
    load_openclip_state,
    megapgs_state,
    write_init_checkpoint,
)
from megapgs.convert.parity import Parity, compare  # noqa: E402

@torch.no_grad()
def check_parity(out: Path, source: OpenCLIPWeights) -> Parity:
    """OUT loaded as megapgs's CLIP against the source loaded by open_clip itself."""
    import open_clip

    state, spec = load_init_weights(out)
    ours = clip_from_state(spec, state)
    del state
    if source.model.startswith(LOCAL_DIR):
        theirs = open_clip.create_model(source.model)
    else:
        bias = {"init_logit_bias": 0.0} if source.has_logit_bias else {}
        theirs = open_clip.create_model(source.model, pretrained=str(source.weights_file), **bias)
    return compare(ours, theirs.eval(), spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="local-dir:DIR, an OpenCLIP model directory, or an OpenCLIP architecture name")
    parser.add_argument("out", type=Path, help="output directory (a megapgs initial checkpoint)")
    parser.add_argument("--pretrained", type=Path, metavar="FILE",
                        help="the state-dict file (.safetensors, .pt, .bin) of an architecture name")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        source = load_openclip_state(args.source, args.pretrained)
        params = sum(value.numel() for value in source.state.values())
        print(f"read {source.weights_file}: OpenCLIP {source.model} is megapgs {source.spec.name} "
              f"({len(source.state)} tensors, {params / 1e6:.1f} M parameters, "
              f"{'/'.join(source.describe()['dtypes'])}) in {time.perf_counter() - started:.1f} s", flush=True)
        written = write_init_checkpoint(args.out, source.spec, megapgs_state(source), source.describe())
        source = dataclasses.replace(source, state={})  # parity reads both sides from their files
    except (ConversionError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for file in written:
        print(f"wrote {file} ({file.stat().st_size / 1e6:.1f} MB)")
    print(f"checking parity with open_clip ({time.perf_counter() - started:.1f} s so far)", flush=True)
    parity = check_parity(args.out, source)
    line = f"{parity.describe(source.spec.name, source.model)}; {time.perf_counter() - started:.1f} s in all"
    if not parity.ok:
        print(f"error: {line}", file=sys.stderr)
        return 1
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
