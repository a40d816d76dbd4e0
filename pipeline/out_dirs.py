"""Directories a command writes into: checked before any work, left as found when it fails.

A command that writes (a run, an export, a replay, a submitted job, a comparison plot) checks its
destination first, so a bad path is one line before a model loads, not a traceback a minute
later; and a directory it creates, then fails in before writing anything, is removed again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutDirError(ValueError):
    """A destination cannot be written; the message says why and what to do."""


def check_writable(path: Path, fix: str) -> None:
    """Raise :class:`OutDirError` unless ``path`` is a directory this process may write in, or
    can be created as one (its nearest existing ancestor is a writable directory). Creates
    nothing. ``fix`` ends the message: what the user can do instead."""
    existing = path.absolute()
    while not os.path.lexists(existing):  # lexists: a dangling link is in the way, not absent
        existing = existing.parent
    if not existing.is_dir():
        what = "" if existing == path.absolute() else f"{path}: "
        raise OutDirError(f"{what}{existing} is not a directory; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "write in" if existing == path.absolute() else f"create {path} in"
        raise OutDirError(f"cannot {where} {existing} (no write permission, or a read-only file "
                          f"system); {fix}")


def check_new(path: Path, fix: str) -> None:
    """:func:`check_writable`, and ``path`` holds nothing yet: an output is never mixed into the
    files of another (a stale weight shard beside new ones loads as part of the model)."""
    if path.is_dir() and any(path.iterdir()):
        raise OutDirError(f"{path} is not empty; {fix}")
    check_writable(path, fix)


@contextmanager
def created(path: Path) -> Iterator[None]:
    """Make ``path`` (and missing parents); if the body raises, remove again the directories this
    made that are still empty, so a command that failed before writing leaves nothing."""
    new = []
    missing = path.absolute()
    while not os.path.lexists(missing):
        new.append(missing)  # deepest first
        missing = missing.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for directory in new:
            try:
                directory.rmdir()
            except OSError:  # not empty (something was written), or gone already
                break
        raise
