"""Stopping on request: SIGTERM or SIGUSR1 makes every rank finish its step, write a checkpoint and
exit with PREEMPTED_EXIT, so that a scheduler that preempts or times out a job loses no work.

Slurm sends the signal ahead of the time limit to every task (`#SBATCH --signal=USR1@600` in
launch/slurm.sbatch) and SIGTERM on preemption; torchrun's agent and DeepSpeed's launcher forward
SIGTERM to their ranks (and kill them about 30 s later: under those launchers the checkpoint must fit
in that grace). The ranks need not receive the signal at the same step: after each step they agree,
in one small CPU collective, whether any of them has been asked, and all stop after the same step.
The handler only sets a flag (logging from a signal handler can deadlock); the loop does the rest.
"""
from __future__ import annotations

import logging
import signal
import threading

from megapgs.dist import DistInfo, any_rank

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 3            # the exit code of a run stopped by a signal, its checkpoint written
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Within `with StopRequest() as stop:` the stop signals set a flag instead of ending the process;
    `stop.agreed(dist)` (every rank, at the same point) says whether any rank received one."""

    def __init__(self):
        self.received: int | None = None   # the first signal's number
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self, dist: DistInfo) -> bool:
        return any_rank(self.received is not None, dist)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "another rank's signal"
