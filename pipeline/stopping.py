"""Stop requests: SIGTERM, SIGINT or a ``STOP`` file in the run directory.

A request only sets a flag; the trainer checks it at step boundaries, checkpoints and exits, so a
stop never interrupts a half-applied perturbation. The ``STOP`` file is how a SLURM batch script
(which receives the preemption signal, not the ranks) asks a job to stop.
"""

from __future__ import annotations

import signal
from pathlib import Path

STOP_FILE = "STOP"
STOPPED_FILE = "stopped.json"  # written by rank 0 when a stop was honoured; gone on resume


class StopRequest:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.signum: int | None = None
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        del frame
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        return self.signum is not None or (self.run_dir / STOP_FILE).exists()

    @property
    def exit_code(self) -> int:
        """128 + signal number, as a shell reports a signalled process (SIGTERM for STOP)."""
        return 128 + (self.signum or signal.SIGTERM)
