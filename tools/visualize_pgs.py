"""Draw what PGS keeps on real photos: a PNG grid like the paper's figure.

    python tools/visualize_pgs.py --out docs/pgs_example.png

Rows are scikit-image photos; columns: the original, random masking (FLIP-style, at PGS's
cap k_max), PGS with the paper's candidate policy, PGS with the reference policy, and the
Sobel edge map whose per-patch means rank the paper policy's candidates. Kept patches are
shown as they are, masked ones greyed out; each masked column is labelled with k/L. The
selection is the one at the start of training (progress 0: pixel similarity only, so no
model is needed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from megapgs.config import PGSConfig  # noqa: E402
from megapgs.data.photos import PHOTOS, load_photo, normalize  # noqa: E402
from megapgs.pgs.selection import pgs_generator, random_selection, select_patches, sobel_magnitude  # noqa: E402

COLUMNS = ("original", "random masking", "PGS (paper)", "PGS (reference)", "edge map")
HEADER, FOOTER, GAP = 22, 18, 6


def grey_out(image_CHW: torch.Tensor, kept_L: torch.Tensor, patch: int) -> torch.Tensor:
    """Masked patches become a flat 60% grey with a faint trace of the photo."""
    grid = image_CHW.shape[1] // patch
    kept = kept_L.view(1, 1, grid, grid).float()
    kept = F.interpolate(kept, scale_factor=patch, mode="nearest")[0]
    return kept * image_CHW + (1 - kept) * (0.6 + 0.15 * (image_CHW - 0.5))


def edge_panel(magnitude_1HW: torch.Tensor) -> torch.Tensor:
    """The Sobel magnitude PGS averages per patch, square-root scaled so faint outlines show."""
    scaled = (magnitude_1HW / magnitude_1HW.max().clamp(min=1e-6)).sqrt()
    return scaled.expand(3, -1, -1)


def to_pil(image_CHW: torch.Tensor) -> Image.Image:
    array = (image_CHW.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def panels_for(photos: torch.Tensor, patch: int, seed: int) -> list[list[tuple[torch.Tensor, str]]]:
    """Per photo, the five (image, label) panels."""
    images = normalize(photos)
    batch, _, size, _ = images.shape
    num_patches = (size // patch) ** 2
    tokens = torch.zeros(batch, num_patches, 1)  # unused at progress 0 (pixel similarity only)
    gen = lambda: pgs_generator(seed, 0, 0)  # noqa: E731 - every column draws from the same stream
    paper = select_patches(images, tokens, patch, PGSConfig(), 0.0, gen())
    reference = select_patches(images, tokens, patch, PGSConfig(candidate_policy="reference"), 0.0, gen())
    random = random_selection(batch, num_patches, PGSConfig(masking="random"), gen(), "cpu")
    edges = sobel_magnitude(images)
    rows = []
    for i in range(batch):
        def masked(selection):
            kept = selection.kept_mask()[i]
            return grey_out(photos[i], kept, patch), f"k = {int(kept.sum())}/{num_patches}"
        rows.append([(photos[i], ""), masked(random), masked(paper), masked(reference),
                     (edge_panel(edges[i]), "Sobel magnitude")])
    return rows


def render(rows: list[list[tuple[torch.Tensor, str]]], size: int) -> Image.Image:
    cols = len(COLUMNS)
    width = cols * size + (cols + 1) * GAP
    height = HEADER + len(rows) * (size + FOOTER + GAP) + GAP
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(COLUMNS):
        draw.text((GAP + c * (size + GAP) + 4, 5), title, fill="black")
    for r, row in enumerate(rows):
        top = HEADER + r * (size + FOOTER + GAP)
        for c, (panel, label) in enumerate(row):
            left = GAP + c * (size + GAP)
            canvas.paste(to_pil(panel), (left, top))
            if label:
                draw.text((left + 4, top + size + 3), label, fill="black")
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/pgs_example.png"))
    parser.add_argument("--photos", nargs="+", default=list(PHOTOS[:4]), help=f"scikit-image photos ({', '.join(PHOTOS)})")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--patch", type=int, default=16, help="patch side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.size % args.patch:
        parser.error(f"--size {args.size} is not a multiple of --patch {args.patch}")
    photos = torch.stack([load_photo(name, args.size) for name in args.photos])
    image = render(panels_for(photos, args.patch, args.seed), args.size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out} ({image.width}x{image.height}): {', '.join(args.photos)}; patch {args.patch}, "
          f"{(args.size // args.patch) ** 2} patches per photo")


if __name__ == "__main__":
    main()
