"""Time the PGS stage (selection + packing) beside the training step it belongs to.

    python tools/bench_pgs.py                        # CUDA if present: ViT-L/14, B=128, bf16 autocast
    python tools/bench_pgs.py --device cpu --preset tiny

Inputs are real photos (scikit-image's, tiled to the batch) so the similarity step sees real
structure. For each masking variant it prints the stage's median time, the median time of a
whole model step (both towers forward + backward + AdamW, the stage included), the stage's
share of that step and the image tokens the blocks compute (a static token budget computes its
padding too); the unmasked step is the baseline of the same run. `pgs` packs as training does on
the device (`pgs.packed_length: auto`: static on CUDA, exact on the CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megapgs.config import PGSConfig  # noqa: E402
from megapgs.data.photos import PHOTOS, photo_batch  # noqa: E402
from megapgs.models.archs import get_arch  # noqa: E402
from megapgs.models.attention import resolve_backend  # noqa: E402
from megapgs.models.clip import CLIP  # noqa: E402
from megapgs.pgs.pack import PatchMasker  # noqa: E402
from megapgs.pgs.selection import pgs_generator  # noqa: E402
from megapgs.perf.timers import device_label, median_ms  # noqa: E402

PRESETS = {"vitl": ("ViT-L-14", 128), "vitb16": ("ViT-B-16", 128), "tiny": ("tiny-28", 128)}
VARIANTS = {  # name: pgs config overrides (None: no masking)
    "none": None,
    "random": {"masking": "random"},
    "pgs": {},
    "pgs-no-ot": {"use_ot": False},
    "pgs-0.5": {"min_mask_ratio": 0.5},
    "pgs-exact": {"packed_length": "exact"},    # sum(k_i + 1) tokens, the counts read back (a sync)
    "pgs-static": {"packed_length": "static"},  # the static token budget B (k_max + 1) + padding
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=PRESETS, default=None, help="default: vitl on CUDA, tiny on CPU")
    parser.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--progress", type=float, default=0.5, help="training progress: weight of token similarity")
    args = parser.parse_args()
    device = torch.device(args.device)
    preset = args.preset or ("vitl" if device.type == "cuda" else "tiny")
    arch, batch = PRESETS[preset]
    batch = args.batch or batch
    spec = get_arch(arch)
    vision = spec.vision
    torch.manual_seed(0)
    model = CLIP(spec).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model.set_attention(resolve_backend("auto", device, dtype, training=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    photos = photo_batch(vision.image_size).to(device)
    images = photos.repeat((batch + len(PHOTOS) - 1) // len(PHOTOS), 1, 1, 1)[:batch]
    images = torch.where(torch.rand(batch, 1, 1, 1, device=device) < 0.5, images, images.flip(3))
    ctx = spec.text.context_length
    text = torch.randint(1, spec.text.vocab_size - 1, (batch, ctx))
    eot_at = torch.randint(4, ctx, (batch,))
    text[torch.arange(batch), eot_at] = spec.text.vocab_size - 1
    text[torch.arange(ctx)[None, :] > eot_at[:, None]] = 0
    text_lengths = (eot_at + 1).tolist()
    text = text.to(device)
    labels = torch.arange(batch, device=device)
    print(f"# {device_label(device)}; {arch} (L={vision.num_patches}, D={vision.width}), B={batch}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, attention {model.visual.transformer.backend}, "
          f"progress {args.progress}; median of {args.repeats}")

    step = 0
    for name, overrides in VARIANTS.items():
        cfg = PGSConfig(**overrides) if overrides is not None else None

        def masker() -> PatchMasker | None:
            nonlocal step
            step += 1
            if cfg is None:
                return None
            static = cfg.packed_length == "static" or (cfg.packed_length == "auto" and device.type == "cuda")
            return PatchMasker(cfg, vision.patch_size, args.progress, pgs_generator(0, step, 0, device), static)

        def stage() -> None:
            with torch.no_grad(), autocast:
                cls, tokens = model.visual.embed(images)
                masker()(images, cls, tokens)

        def train_step() -> None:
            keep = masker()
            with autocast:
                image_emb, text_emb, scale, _ = model(images, text, text_lengths, keep)
                logits = scale * image_emb @ text_emb.t()
                loss = (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.t().float(), labels)) / 2
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_step.keep_ratio = float(keep.selection.counts.float().mean()) / vision.num_patches if keep else 1.0
            train_step.tokens = keep.selection.packed.total_tokens if keep else batch * (vision.num_patches + 1)

        step_ms = median_ms(train_step, device, args.repeats)
        if cfg is None:
            print(f"{name:>10}: stage        -      step {step_ms:9.2f} ms   keep 1.000 (baseline)   "
                  f"{train_step.tokens} image tokens")
            continue
        stage_ms = median_ms(stage, device, args.repeats)
        print(f"{name:>10}: stage {stage_ms:8.2f} ms  step {step_ms:9.2f} ms   keep {train_step.keep_ratio:.3f}"
              f"   stage = {100 * stage_ms / step_ms:5.2f}% of the step   {train_step.tokens} image tokens")


if __name__ == "__main__":
    main()
