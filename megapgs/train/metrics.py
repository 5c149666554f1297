"""Where metrics go: one JSON object per line in <run>/metrics.jsonl and TensorBoard events in
<run>/tensorboard, written by rank 0 only. Values arrive already reduced over ranks."""
from __future__ import annotations

import json
import math
from pathlib import Path

from megapgs.config import LogConfig


class MetricsWriter:
    def __init__(self, run_dir: Path, cfg: LogConfig, is_main: bool):
        self.enabled = is_main
        self._jsonl = None
        self._tb = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.jsonl:
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: a crash loses no line
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(v) else v) for k, v in metrics.items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"kind": kind, "step": step, **clean}) + "\n")
        if self._tb is not None:
            for name, value in clean.items():
                if isinstance(value, float):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
