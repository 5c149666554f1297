"""Zero-shot classification and image <-> text retrieval of a megapgs or OpenCLIP model on local
held-out data, with the numbers in-training evaluation logs (the same code computes them).

    python tools/evaluate.py runs/tiny_cpu --data data/fashion_mnist
    python tools/evaluate.py local-dir:OPENCLIP_DIR --data data/fashion_mnist --max-samples 2000
    python tools/evaluate.py ViT-B-16 --pretrained ViT-B-16.safetensors --images imagenet/val \\
        --classnames classnames.txt --templates templates.txt

The model: a megapgs run directory or checkpoint (any ZeRO stage), an OpenCLIP model directory
(`local-dir:DIR`, as tools/convert_to_openclip.py writes it), or an OpenCLIP architecture name with
`--pretrained FILE`. OpenCLIP weights load with safetensors or torch.load(weights_only=True).
The data: `--data ROOT` in clip_benchmark's webdataset layout (ROOT/classnames.txt,
ROOT/zeroshot_classification_templates.txt, ROOT/test/*.tar with `.cls` and `.txt`; a retrieval
set such as wds/mscoco_captions has no class names and one caption per line of `.txt`: retrieval
only, an image's hit is any of its captions), or `--images DIR` with one sub-folder per class
(classification only). Under torchrun the ranks share --data. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEFAULT_TEMPLATES = ["a photo of a {c}."]


class OpenCLIPModel(torch.nn.Module):
    """An OpenCLIP model behind megapgs's evaluation interface (unit-norm embeddings). megapgs's
    loaders normalise with OpenAI's mean and std; a model trained with others (its preprocess_cfg)
    gets its images renormalised, which is exact."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        self.model = model
        cfg = getattr(model.visual, "preprocess_cfg", {})
        if cfg.get("resize_mode", "shortest") != "shortest" or cfg.get("interpolation", "bicubic") != "bicubic":
            raise ValueError(f"this OpenCLIP model preprocesses with resize_mode={cfg.get('resize_mode')!r}, "
                             f"interpolation={cfg.get('interpolation')!r}; megapgs evaluates with 'shortest' "
                             "and 'bicubic' (clip_benchmark with the model's own: use it for this model)")
        ours = torch.tensor(OPENAI_DATASET_MEAN), torch.tensor(OPENAI_DATASET_STD)
        theirs = torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN)), torch.tensor(cfg.get("std", OPENAI_DATASET_STD))
        # x_theirs = (x_ours * std_ours + mean_ours - mean_theirs) / std_theirs = x_ours * scale + shift
        self.register_buffer("scale", (ours[1] / theirs[1]).view(1, 3, 1, 1))
        self.register_buffer("shift", ((ours[0] - theirs[0]) / theirs[1]).view(1, 3, 1, 1))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(images * self.scale + self.shift), dim=-1)

    def encode_text(self, tokens: torch.Tensor, lengths=None) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens), dim=-1)


def load_openclip(name: str, pretrained: str | None):
    """(model, tokenizer, image size) of an OpenCLIP model directory or architecture + weights file."""
    import open_clip

    from megapgs.models.text import eot_lengths

    if not name.startswith("local-dir:") and pretrained is None:
        raise ValueError(f"{name!r}: an OpenCLIP architecture needs --pretrained FILE (its weights)")
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"--pretrained {pretrained}: no such file")
    # weights_only=True is open_clip's default for .pt/.bin; .safetensors never unpickles.
    model = open_clip.create_model(name, pretrained=pretrained, weights_only=True)
    tokenize = open_clip.get_tokenizer(name)
    context = model.context_length

    def tokenizer(captions):
        tokens = tokenize(list(captions), context_length=context).to(torch.int64)
        return tokens, eot_lengths(tokens).tolist()

    return OpenCLIPModel(model).eval(), tokenizer, model.visual.image_size[0]


def load_megapgs(path: Path):
    """(model, tokenizer, image size) of a megapgs run directory or checkpoint."""
    from megapgs.convert.checkpoint import clip_from_state, read_checkpoint
    from megapgs.data.tokenizer import Tokenizer
    from megapgs.models.archs import get_arch

    state, config = read_checkpoint(path)
    arch = get_arch(config["model"]["arch"])
    return clip_from_state(arch, state), Tokenizer(arch.name), arch.vision.image_size


def load_model(spec: str, pretrained: str | None = None):
    """(model, tokenizer, image size): an OpenCLIP `local-dir:`/architecture, else a megapgs path."""
    if spec.startswith("local-dir:") or pretrained is not None:
        return load_openclip(spec, pretrained)
    path = Path(spec)
    if not path.exists() and spec in open_clip_names():
        raise ValueError(f"{spec!r}: an OpenCLIP architecture needs --pretrained FILE (its weights)")
    if not path.exists():
        raise FileNotFoundError(f"{spec}: no such megapgs run or checkpoint (for an OpenCLIP model give "
                                "local-dir:DIR, or an architecture name with --pretrained FILE)")
    return load_megapgs(path)


def open_clip_names() -> set[str]:
    import open_clip

    return set(open_clip.list_models())


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def folder_task(args) -> tuple[list[str], list[str]]:
    """Class names and templates of an image-folder evaluation."""
    from megapgs.data.eval_data import folder_classes

    folders = folder_classes(args.images)
    if args.classnames is not None:
        classnames = read_lines(args.classnames)
        if len(classnames) != len(folders):
            raise ValueError(f"--classnames {args.classnames}: {len(classnames)} names for {len(folders)} class "
                             "folders (one name per line, in the sorted order of the folders)")
    else:
        classnames = [name.replace("_", " ") for name in folders]
    templates = read_lines(args.templates) if args.templates is not None else DEFAULT_TEMPLATES
    if any("{c}" not in template for template in templates):
        raise ValueError(f"--templates {args.templates}: every template needs the class placeholder {{c}}")
    return classnames, templates


def with_progress(batches, total_batches: int | None, show: bool):
    """The batches behind a progress bar on stderr (stdout keeps the one JSON line)."""
    from rich.progress import track

    from megapgs.log import console

    return track(batches, description="evaluate", total=total_batches, console=console, transient=True,
                 disable=not (show and console.is_terminal))


def run(args) -> dict[str, float]:
    from megapgs.data.eval_data import eval_units, iter_folder_batches, iter_unit_batches, rank_units
    from megapgs.data.faults import SkipCounter
    from megapgs.dist import init_distributed
    from megapgs.evals.evaluate import eval_shards, evaluate_batches
    from megapgs.evals.zeroshot import read_classnames_and_templates

    dist = init_distributed()  # under torchrun the ranks share the set
    dist = type(dist)(dist.rank, dist.world_size, dist.local_rank, torch.device("cpu"))
    model, tokenizer, image_size = load_model(args.model, args.pretrained)
    skips = SkipCounter()
    if args.images is not None:
        if dist.world_size > 1:
            raise ValueError("--images is evaluated by one process; --data shards can be shared by ranks")
        classnames, templates = folder_task(args)
        batches = iter_folder_batches(args.images, image_size=image_size, batch_size=args.batch_size, skips=skips)
        total = math.ceil(args.max_samples / args.batch_size) if args.max_samples else None
        retrieval, max_samples = False, args.max_samples  # folders have no captions
    else:
        zeroshot = (Path(args.data) / "classnames.txt").is_file()  # clip_benchmark's retrieval sets have none
        classnames, templates = read_classnames_and_templates(args.data) if zeroshot else (None, None)
        if not zeroshot and args.no_retrieval:
            raise ValueError(f"{args.data} has no classnames.txt (a retrieval set): --no-retrieval leaves nothing")
        units = rank_units(eval_units(eval_shards(args.data), args.batch_size, args.max_samples),
                           dist.rank, dist.world_size)
        batches = iter_unit_batches(units, image_size=image_size, workers=args.workers, skips=skips)
        total, retrieval, max_samples = len(units), not args.no_retrieval, None
    if dist.is_main:
        task = [f"{len(classnames)} classes x {len(templates)} template(s)"] if classnames else []
        print(f"evaluate: {args.model}, {', '.join(task + (['retrieval'] if retrieval else []))}"
              f"{f', shared by {dist.world_size} ranks' if dist.world_size > 1 else ''}", file=sys.stderr)
    metrics = evaluate_batches(model, with_progress(batches, total, dist.is_main), tokenizer,
                               device=dist.device, classnames=classnames, templates=templates,
                               retrieval=retrieval, max_samples=max_samples, source=args.images or args.data,
                               dist=dist, image_size=image_size, prompt_batch_size=args.batch_size)
    if skips.total:
        metrics["eval_skipped"] = float(skips.total)  # this rank's
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="megapgs run/checkpoint, local-dir:OPENCLIP_DIR, or an OpenCLIP architecture")
    parser.add_argument("--pretrained", help="weights file of an OpenCLIP architecture (.safetensors, .pt, .bin)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="held-out webdataset root (clip_benchmark's wds layout)")
    source.add_argument("--images", type=Path, help="image folder: one sub-folder of images per class")
    parser.add_argument("--classnames", type=Path, help="with --images: class names, one per line (default: "
                        "the folder names, underscores as spaces)")
    parser.add_argument("--templates", type=Path, help="with --images: templates with {c}, one per line "
                        f"(default: {DEFAULT_TEMPLATES[0]!r})")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--no-retrieval", action="store_true", help="zero-shot classification only")
    parser.add_argument("--workers", type=int, default=0, help="processes decoding --data shards (per rank)")
    args = parser.parse_args(argv)
    if args.images is None and (args.classnames or args.templates):
        parser.error("--classnames/--templates go with --images (a --data root holds its own)")
    try:
        metrics = run(args)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rounded = {name: round(value, 4) for name, value in metrics.items()}
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # every rank has the numbers; rank 0 prints them
    print(json.dumps({"model": args.model, "data": str(args.images or args.data), **rounded}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
