"""Write webdataset shards that megapgs (and any webdataset or DALI reader) trains on.

    # a folder of images with a captions file (CSV, JSONL, or parquet when pyarrow is installed)
    python tools/make_shards.py folder IMAGES_DIR captions.csv --out shards/ --shard-size 5000
    # the Fashion-MNIST idx files (the embedded default's data: train/ and test/ in clip_benchmark's layout)
    python tools/make_shards.py fashion-mnist --out data/fashion_mnist

Each sample is `{key}.jpg|png|webp` + `{key}.txt` (+ `{key}.json` with the caption file's other
columns). Beside the shards: one DALI index per shard (`{i}.idx`), `manifest.json` (shards and
sample counts, what the loaders read) and `nshards.txt`. Rows whose image is missing or unreadable
or whose caption is empty are skipped and counted; the summary says how many and why.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from megapgs.config import DataConfig  # noqa: E402
from megapgs.data.fashion_mnist import locate_raw, prepare_fashion_mnist  # noqa: E402
from megapgs.data.faults import SkipCounter, check_caption, decode_image  # noqa: E402
from megapgs.data.shards import write_shards  # noqa: E402
from megapgs.log import setup_logging  # noqa: E402

IMAGE_COLUMNS = ("image", "file", "filename", "filepath", "file_name", "path")
CAPTION_COLUMNS = ("caption", "text", "title", "txt")
STORED_AS_IS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def read_caption_rows(path: Path) -> list[dict]:
    """The rows of a captions file: CSV (with a header), JSONL, or parquet (needs pyarrow)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise SystemExit(f"error: {path}:{number} is not a JSON object: {err}") from None
        return rows
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit("error: reading parquet needs pyarrow, which is not installed "
                             "(pip install pyarrow), or convert the captions to CSV or JSONL") from None
        return pq.read_table(path).to_pylist()
    raise SystemExit(f"error: {path}: captions must be .csv, .jsonl or .parquet (got {suffix or 'no suffix'})")


def pick_column(rows: list[dict], given: str | None, candidates: tuple[str, ...], what: str) -> str:
    columns = list(rows[0]) if rows else []
    if given:
        if given not in columns:
            raise SystemExit(f"error: no column {given!r} in the captions file (columns: {', '.join(columns)})")
        return given
    for name in candidates:
        if name in columns:
            return name
    raise SystemExit(f"error: no {what} column among {', '.join(columns)}; name it with --{what}-column")


def folder_samples(rows: list[dict], images_dir: Path, image_column: str, caption_column: str,
                   skips: SkipCounter, check_images: bool) -> Iterator[dict]:
    """Webdataset samples from caption rows; bad rows are counted in `skips` and left out."""
    written = 0
    for row in rows:
        name = str(row.get(image_column) or "")
        image_path = images_dir / name
        if not name or not image_path.is_file():
            skips.add("image_missing", name or "(empty image column)")
            continue
        caption, reason = check_caption(str(row.get(caption_column) or "").encode("utf-8"))
        if reason is not None:
            skips.add(reason, name)
            continue
        data = image_path.read_bytes()
        ext = STORED_AS_IS.get(image_path.suffix.lower())
        if check_images or ext is None:
            image, reason = decode_image(data)
            if reason is not None:
                skips.add(reason, name)
                continue
            if ext is None:  # a format DALI and PIL readers may not share: store it as PNG
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                data, ext = buffer.getvalue(), "png"
        extra = {k: v for k, v in row.items() if k not in (image_column, caption_column)}
        sample = {"__key__": f"{written:09d}", ext: data, "txt": caption,
                  "json": json.dumps({"source": name, **extra}, default=str)}
        written += 1
        yield sample


def print_summary(manifest: dict, out_dir: Path, skips: SkipCounter) -> None:
    print(f"wrote {manifest['samples']:,} samples in {len(manifest['shards'])} shards to {out_dir} "
          f"(manifest.json, DALI indexes *.idx); {skips.summary()}")


def main(argv: list[str] | None = None) -> int:
    default_size = DataConfig.model_fields["shard_size"].default
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    folder = modes.add_parser("folder", help="a folder of images with a captions CSV/JSONL/parquet")
    folder.add_argument("images_dir", type=Path)
    folder.add_argument("captions", type=Path, help="one row per image: image file (relative to IMAGES_DIR), caption")
    folder.add_argument("--image-column", help=f"default: the first of {', '.join(IMAGE_COLUMNS)}")
    folder.add_argument("--caption-column", help=f"default: the first of {', '.join(CAPTION_COLUMNS)}")
    folder.add_argument("--no-check-images", action="store_true",
                        help="store JPEG/PNG/WebP bytes without decoding them first (faster; bad images then "
                             "reach the loader, which skips them)")
    fmnist = modes.add_parser("fashion-mnist", help="the Fashion-MNIST idx files (train and test splits)")
    fmnist.add_argument("--raw", type=Path, default=Path(DataConfig.model_fields["fashion_mnist_dir"].default),
                        help="folder with the four idx .gz files")
    fmnist.add_argument("--max-samples", type=int, help="cap each split (for a quick look)")
    for sub in (folder, fmnist):
        sub.add_argument("--out", type=Path, required=True, help="output folder")
        sub.add_argument("--shard-size", type=int, default=default_size, help="samples per shard")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be at least 1")

    if args.mode == "fashion-mnist":
        raw = locate_raw(args.raw, args.out.parent / "downloads")
        manifests = prepare_fashion_mnist(raw, args.out, args.shard_size, args.max_samples)
        for split, manifest in manifests.items():
            print_summary(manifest, args.out / split, SkipCounter())
        return 0

    if not args.images_dir.is_dir():
        parser.error(f"{args.images_dir} is not a folder")
    if not args.captions.is_file():
        parser.error(f"no captions file at {args.captions}")
    rows = read_caption_rows(args.captions)
    if not rows:
        raise SystemExit(f"error: {args.captions} has no rows")
    image_column = pick_column(rows, args.image_column, IMAGE_COLUMNS, "image")
    caption_column = pick_column(rows, args.caption_column, CAPTION_COLUMNS, "caption")
    skips = SkipCounter()
    samples = folder_samples(rows, args.images_dir, image_column, caption_column, skips, not args.no_check_images)
    manifest = write_shards(samples, args.out, args.shard_size, total=len(rows), description="writing shards",
                           checked=not args.no_check_images)
    print_summary(manifest, args.out, skips)
    if manifest["samples"] == 0:
        print("error: no row made a sample; see the skip reasons above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    setup_logging("info", rank=0)
    sys.exit(main())
