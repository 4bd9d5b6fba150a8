"""Small file helpers shared by the data pipeline: atomic writes, JSONL, sha256.

Every output of the pipeline is written to a temporary name in the same directory and renamed into
place, so an interrupted build never leaves a half-written file under the final name (a reader sees
either the old file or the new one). JSONL is written with sorted keys and no platform-dependent
formatting, so the same rows give the same bytes on every machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from typing import IO, Any, Iterable, Iterator

from idlm.data import DataError


@contextlib.contextmanager
def atomic_writer(path: str, mode: str = "w") -> Iterator[IO]:
    """Open a temp file next to `path` for writing; on success rename it over `path`, else delete it."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer mode must be 'w' or 'wb', got {mode!r}")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.tmp-")
    except OSError as e:
        raise DataError(f"cannot write {path}: {e}") from e
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": "\n"} if mode == "w" else {})) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary readable files
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise DataError(f"cannot write {path}: {e}") from e
        raise


def json_line(obj: Any) -> str:
    """One canonical JSONL line (sorted keys, UTF-8 kept, trailing newline)."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n"


def write_jsonl(path: str, rows: Iterable[Any]) -> int:
    """Write rows atomically as canonical JSONL; returns the number of rows."""
    n = 0
    with atomic_writer(path) as f:
        for row in rows:
            f.write(json_line(row))
            n += 1
    return n


def write_json(path: str, obj: Any) -> None:
    """Write one JSON document atomically (sorted keys, indented, trailing newline)."""
    with atomic_writer(path) as f:
        f.write(json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=2) + "\n")


def read_json(path: str) -> Any:
    """A JSON document, or DataError naming the file when it is missing or unparsable."""
    if not os.path.isfile(path):
        raise DataError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot parse {path}: {e}") from e


def read_jsonl(path: str) -> Iterator[Any]:
    """Rows of a JSONL file, lazily; DataError naming file and line when a line is not JSON."""
    if not os.path.isfile(path):
        raise DataError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{lineno}: not a JSON line: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def sha256_file(path: str, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(chunk_bytes):
                h.update(chunk)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def unit_hash(text: str) -> float:
    """A machine-independent pseudo-random number in [0, 1) derived from `text` (first 32 bits of sha256)."""
    return int(sha256_text(text)[:8], 16) / 2**32
