"""The exit codes of a megapgs run (`pretrain.py`, `launch/pretrain.py`), each with one message
that names the cause and the way out; the README lists them. DeepSpeed's launcher and srun exit
with the failing rank's code; torchrun exits 1 and lists each rank's code in its failure table."""
from __future__ import annotations

from megapgs.train.preempt import PREEMPTED_EXIT

OK = 0
UNEXPECTED = 1        # an error megapgs does not foresee: Python's traceback (please report it)
BAD_INPUT = 2         # a config, data, start point or checkpoint file refused; the message names it
PREEMPTED = PREEMPTED_EXIT  # 3: stopped by SIGTERM/SIGUSR1, checkpoint written; continue with --resume auto
RESUME_REFUSED = 4    # the checkpoint's run differs in what a resume cannot change (model.arch, ...)
OUTPUT_DIR = 5        # train.output_dir cannot be created or written
DISK_FULL = 6         # the disk filled while the run wrote; the last complete checkpoint stands
