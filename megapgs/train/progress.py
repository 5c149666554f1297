"""The progress bar of a training run on rank 0: step, samples/s, loss, keep ratio, lr, ETA."""
from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from megapgs.log import console


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(bar_width=30), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TextColumn("elapsed"), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), console=console, disable=not enabled,
            refresh_per_second=2)
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, stats="")

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._progress.stop()

    def advance(self, step: int, samples_seen: int) -> None:
        if self.enabled:
            self._progress.update(self._task, completed=step)

    def show(self, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        stats = (f"loss {metrics['loss']:.4f}  {metrics['samples_per_s']:,.0f} samples/s  "
                 f"keep {metrics['keep_ratio']:.2f}  lr {metrics['lr']:.2e}")
        if "mfu" in metrics:
            stats += f"  MFU {100 * metrics['mfu']:.1f}%"
        self._progress.update(self._task, stats=stats)
