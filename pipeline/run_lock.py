"""One process at a time in a run directory: an exclusive OS lock on ``<run_dir>/.lock``.

``flock`` locks belong to the open file, so they die with the process: a SIGKILLed run, or a
SLURM job preempted and requeued, leaves no stale lock and the next job takes it. Only global
rank 0 (``RANK`` of torchrun, 0 without it) locks; the other ranks write only what rank 0's
checkpoint protocol tells them to. The lock file holds the holder's pid and host, for the
refusal message.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.run_dir import RunDirError

LOCK_FILE = ".lock"


class RunDirLocked(RunDirError):
    """Another process holds the run directory; the message names it and the fix."""


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunDirLocked(
                f"{run_dir} is in use by {holder}: wait for that run to end (a SIGTERM to it "
                "checkpoints and stops it), or give this one another --run-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
