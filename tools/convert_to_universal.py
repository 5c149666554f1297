"""Convert a megapgs ZeRO-1/2/3 checkpoint to DeepSpeed's Universal Checkpoint ahead of a resume on
another number of ranks (megapgs/train/reshard.py), on any machine that sees the checkpoint:

    python tools/convert_to_universal.py runs/vitg/checkpoints/step_00200000

A resume does the same conversion on global rank 0 while the other ranks wait in a collective,
which gives up after the process group's timeout (30 minutes); a checkpoint of a billion-parameter
model on hundreds of ranks is better converted here first. The run then finds
`<checkpoint>/universal` complete and loads it at once.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megapgs.train.checkpoint import COMPLETE  # noqa: E402
from megapgs.train.reshard import ReshardError, convert_to_universal, zero_partitioned  # noqa: E402
from megapgs.train.safe_load import UnsafeCheckpointError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a complete checkpoint directory (holds COMPLETE)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (args.checkpoint / COMPLETE).is_file():
        print(f"error: {args.checkpoint} is not a complete megapgs checkpoint (no {COMPLETE} file)", file=sys.stderr)
        return 2
    if not zero_partitioned(args.checkpoint):
        print(f"{args.checkpoint} is a ZeRO-0 checkpoint: it resumes on any number of ranks as it is")
        return 0
    try:
        folder = convert_to_universal(args.checkpoint)
    except (ReshardError, UnsafeCheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"universal checkpoint: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
