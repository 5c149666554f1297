"""Multi-node entry: `deepspeed --hostfile launch/hostfile launch/pretrain.py --config configs/vitl_pgs03.json`.

The DeepSpeed launcher (or launch/slurm.sbatch) starts one process per GPU with RANK, LOCAL_RANK and
WORLD_SIZE set; each runs megapgs/entry.py's main, exactly as `python pretrain.py` does on one rank.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for `megapgs`

from megapgs.entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
