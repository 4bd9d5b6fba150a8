"""Atomic directory writes: nothing half-written is ever visible under the final name.

`atomic_dir(path)` yields a temporary sibling directory to fill; when the block completes it takes
`path`'s place in one rename (an existing `path` is moved aside first and removed after), and when the
block fails (an exception, a full disk, Ctrl-C) the temporary directory is removed and `path` is left
exactly as it was. Used for checkpoints, saved models and adapters.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
