"""Small file helpers shared by the data pipeline: atomic writes, JSONL, sha256.

Every output of the pipeline is written to a temporary name in the same directory and renamed into
place (`idlm.atomic.atomic_file`), so an interrupted build never leaves a half-written file under the
final name (a reader sees either the old file or the new one). JSONL is written with sorted keys and
no platform-dependent formatting, so the same rows give the same bytes on every machine; every JSONL
file idlm reads goes through `read_jsonl`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
from typing import IO, Any, Iterable, Iterator

from idlm.atomic import atomic_file
from idlm.data import DataError


@contextlib.contextmanager
def atomic_writer(path: str, mode: str = "w") -> Iterator[IO]:
    """`idlm.atomic.atomic_file` (a temp file next to `path`, renamed over it on success, deleted on
    failure), reporting OSError as DataError naming the file."""
    try:
        with atomic_file(path, mode) as f:
            yield f
    except OSError as e:
        raise DataError(f"cannot write {path}: {e}") from e


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


def read_jsonl(path: str | os.PathLike) -> Iterator[Any]:
    """Rows of a JSONL file (gzip-compressed if its name ends in .gz), lazily, blank lines skipped;
    DataError naming file and line when a line is not JSON."""
    if not os.path.isfile(path):
        raise DataError(f"file not found: {path}")
    try:
        opener = gzip.open if os.fspath(path).endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{lineno}: not a JSON line: {e}") from e
    except (OSError, UnicodeDecodeError, EOFError) as e:
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
