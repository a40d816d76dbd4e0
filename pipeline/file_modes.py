"""Files we write follow the user's umask, as ``open()`` would make them.

safetensors (and so ``save_pretrained``) creates its files with mode 0600 whatever the umask, so
a group-shared run directory on a cluster would hold checkpoints and exports a teammate cannot
read. Every file a run writes through such a writer is set back to ``0666 & ~umask``.
"""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process's umask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(*paths: Path) -> None:
    """Give each file (and each file directly inside each directory) mode ``0666 & ~umask``."""
    mode = 0o666 & ~umask()
    for path in paths:
        for f in (path.iterdir() if path.is_dir() else [path]):
            if f.is_file():
                f.chmod(mode)
