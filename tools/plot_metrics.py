"""PNG curves of a training run from its metrics.jsonl: loss, zero-shot accuracy, samples/s, keep ratio.

    python tools/plot_metrics.py runs/tiny_cpu/metrics.jsonl            # writes runs/tiny_cpu/metrics.png
    python tools/plot_metrics.py RUN_A/metrics.jsonl RUN_B/metrics.jsonl --out compare.png --labels pgs random
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PANELS = (  # (title, kind of record, metric)
    ("training loss", "train", "loss"),
    ("zero-shot top-1 (%)", "eval", "zeroshot_top1"),
    ("samples / s", "train", "samples_per_s"),
    ("kept share of patches", "train", "keep_ratio"),
)


def read_metrics(path: Path) -> list[dict]:
    """The JSON lines of a run; a line cut short by a crash is skipped, and said so."""
    records, broken = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            broken += 1
    if broken:
        print(f"{path}: skipped {broken} unreadable line(s)", file=sys.stderr)
    if not records:
        raise SystemExit(f"error: no metrics in {path}")
    return records


def series(records: list[dict], kind: str, metric: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[metric]) for r in records if r.get("kind") == kind and isinstance(r.get(metric), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.jsonl file(s) of one or more runs")
    parser.add_argument("--out", type=Path, help="PNG to write (default: metrics.png next to the first file)")
    parser.add_argument("--labels", nargs="+", help="a legend label per run (default: the run directories)")
    args = parser.parse_args()
    for path in args.metrics:
        if not path.is_file():
            parser.error(f"no such file: {path}")
    labels = args.labels or [path.parent.name for path in args.metrics]
    if len(labels) != len(args.metrics):
        parser.error(f"{len(args.metrics)} runs but {len(labels)} labels")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_metrics(path) for path in args.metrics]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, (title, kind, metric) in zip(axes.flat, PANELS):
        drawn = False
        for records, label in zip(runs, labels):
            steps, values = series(records, kind, metric)
            if steps:
                ax.plot(steps, values, marker="o" if kind == "eval" else None, markersize=4, label=label)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif len(runs) > 1:
            ax.legend()
    out = args.out or args.metrics[0].with_name("metrics.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
