"""One process at a time in a run directory: an exclusive OS lock on ``<run_dir>/.lock``.

``flock`` locks belong to the open file, so they die with the process: a SIGKILLed run, or a
SLURM job preempted and requeued, leaves no stale lock and the next job takes it. Only global
rank 0 (``RANK`` of torchrun, 0 without it) locks; the other ranks write only what rank 0's
checkpoint protocol tells them to. The lock file holds the holder's pid and host, for the
refusal message. A run that fails before writing anything takes its lock file (and the run
directory, if it made it) away again: a failed command leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from pipeline.out_dirs import created
from pipeline.run_dir import LOCK_FILE, RunDirError


class RunDirLocked(RunDirError):
    """Another process holds the run directory; the message names it and the fix."""


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    with created(run_dir), _locked(run_dir) as f:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        except BaseException:
            if os.listdir(run_dir) == [LOCK_FILE]:  # nothing of a run was written
                (run_dir / LOCK_FILE).unlink()
            raise


def _locked(run_dir: Path) -> IO[str]:
    """The lock file, opened and locked. A holder that failed before writing unlinks the file
    as it lets go; a process that locked that unlinked file retries on the path's new one."""
    while True:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirLocked(
                f"{run_dir} is in use by {holder}: wait for that run to end (a SIGTERM to it "
                "checkpoints and stops it), or give this one another --run-dir") from None
        try:
            if os.stat(run_dir / LOCK_FILE).st_ino == os.fstat(f.fileno()).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()
