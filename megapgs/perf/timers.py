"""Wall-clock timing that is honest on GPUs: synchronise around the timed region, drop warm-up
runs, report the median (machines are shared and noisy)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() over `repeats` runs after `warmup` untimed runs."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def device_label(device: torch.device) -> str:
    """What the figures were measured on, for the first line of a benchmark's output."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"cpu ({torch.get_num_threads()} threads), torch {torch.__version__}"


class StageTimer:
    """Accumulates time per named stage of the step without a host sync: CUDA events on a GPU
    (read when the metrics are fetched, every N steps), wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[str, object, object]] = []
        self._totals: dict[str, float] = {}
        self._open: dict[str, object] = {}

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self, stage: str) -> None:
        self._open[stage] = self._now()

    def stop(self, stage: str) -> None:
        begin, end = self._open.pop(stage), self._now()
        if self.cuda:
            self._pending.append((stage, begin, end))
        else:
            self._totals[stage] = self._totals.get(stage, 0.0) + (end - begin) * 1e3

    def collect(self) -> dict[str, float]:
        """Milliseconds per stage since the last collect (this waits for the GPU's events)."""
        for stage, begin, end in self._pending:
            end.synchronize()
            self._totals[stage] = self._totals.get(stage, 0.0) + begin.elapsed_time(end)
        totals, self._totals, self._pending = self._totals, {}, []
        return totals
