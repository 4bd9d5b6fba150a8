"""Atomic, durable, self-cleaning writes of directories and small files.

Why this file exists: checkpoints, saved models and adapters are directories of several files, and the
trainer's `latest` pointer names one of them. A process that dies mid-save (Ctrl-C, OOM kill, a full
disk, a preempted node, a power cut) must leave either the previous version or the new one under the
final name, never a mixture, never an empty or truncated file, and must not leave hidden temporary
copies of gigabytes behind for ever.

- `atomic_dir(path)` yields a temporary sibling `.NAME.tmp-XXXXXXXX` to fill. When the block completes,
  every file and directory in it is fsynced, an existing `path` is renamed aside to
  `.NAME.old-XXXXXXXX`, the temporary directory is renamed to `path`, the parent directory is fsynced
  (so the renames survive a power cut, and a renamed directory is never empty or short afterwards), and
  the old copy is removed. When the block fails (an exception, a full disk, Ctrl-C) the temporary
  directory is removed and `path` is left exactly as it was.
- `atomic_file(path)` does the same for one file (the data pipeline streams its outputs through it):
  write a temporary sibling, flush, fsync it, `os.replace` it onto `path`, fsync the directory;
  `atomic_write_text(path, text)` writes one small file that way.
- Leftovers of a save that was killed (`.NAME.tmp-XXXXXXXX`, `.NAME.old-XXXXXXXX`, exactly that pattern)
  are swept by the next save of the same NAME in the same directory (`sweep_leftovers`); nothing else
  in the directory is touched. A save in progress holds an exclusive `flock` on its temporary directory
  (and on the old copy it moves aside), so a concurrent writer never sweeps another live save's files;
  where the filesystem has no `flock` (some NFS/Lustre mounts) an entry counts as abandoned only once
  nothing in it has changed for `STALE_AFTER_S` seconds.
- A crash between the two renames leaves `path` missing and the previous version complete in
  `.NAME.old-XXXXXXXX`. A reader that finds `path` missing may call `sweep_leftovers(path.parent,
  path.name)`: it puts the newest such old copy back under `path` (and drops abandoned temp copies).
  The next `atomic_dir(path)` does the same before it writes, so if that save fails too the previous
  version is still at `path`, and if it succeeds the new one replaces it as usual.
POSIX semantics are assumed (rename over an existing name, fsync of a directory).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no locks, leftovers are judged by age alone
    fcntl = None  # type: ignore[assignment]

STALE_AFTER_S = 3600.0  # without flock: an untouched leftover this old is abandoned
_ATTEMPTS = 100


def _token() -> str:
    return uuid.uuid4().hex[:8]


# --------------------------------------------------------------------------------------- fsync
def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, making the creations, renames and removals of entries in it durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        _fsync_dir_fd(fd)
    finally:
        os.close(fd)


def _fsync_dir_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as e:  # a few filesystems cannot fsync a directory; their renames are durable anyway
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every regular file under `root`, then every directory bottom-up, `root` itself last."""

    def fail(e: OSError) -> None:
        raise e

    for dirpath, _dirs, files in os.walk(root, topdown=False, onerror=fail):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def ensure_dir(path: str | os.PathLike) -> Path:
    """mkdir -p, fsyncing the parent of every directory it creates (so they survive a power cut)."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p.parent != p:
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for d in reversed(missing):
        fsync_dir(d.parent)
    return path


# --------------------------------------------------------------------------------------- locks
def _try_lock(fd: int) -> bool | None:
    """True: we hold the lock; False: a live save holds it; None: no flock on this filesystem."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _same_inode(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _newest_mtime(path: Path) -> float:
    newest = os.stat(path, follow_symlinks=False).st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.stat(os.path.join(dirpath, name), follow_symlinks=False).st_mtime)
    return newest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


@contextmanager
def _claimed(path: Path) -> Iterator[bool]:
    """Yields True while we hold `path` as an abandoned leftover (no live save has it locked)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:  # gone already, or not ours to judge
        yield False
        return
    try:
        locked = _try_lock(fd)
        if locked is None:
            try:
                locked = time.time() - _newest_mtime(path) > STALE_AFTER_S
            except OSError:
                locked = False
        yield bool(locked) and _same_inode(path, fd)
    finally:
        os.close(fd)


def remove_abandoned(path: str | os.PathLike) -> bool:
    """Remove `path` (file or directory tree) unless a live save holds it; True if it was removed."""
    path = Path(path)
    with _claimed(path) as ok:
        if ok:
            _remove(path)
        return ok


# ------------------------------------------------------------------------------------- sweeping
def sweep_leftovers(directory: str | os.PathLike, name: str | re.Pattern) -> list[Path]:
    """Clear what killed saves of `name` left in `directory`; returns the paths removed.

    Only entries named exactly `.NAME.tmp-XXXXXXXX` or `.NAME.old-XXXXXXXX` (8 lowercase hex digits) are
    considered, NAME being `name` itself or, for a compiled pattern, any name its pattern text fully matches (the
    trainer sweeps every `step-N` at once). Entries a live save holds locked are left alone. When
    `directory/NAME` is missing (a crash between the two renames of `atomic_dir`), the newest abandoned
    `.old` copy is renamed back to `directory/NAME` instead of being removed.
    """
    directory = Path(directory)
    name_re = name.pattern if isinstance(name, re.Pattern) else re.escape(name)
    leftover = re.compile(rf"\.(?P<name>{name_re})\.(?P<kind>tmp|old)-[0-9a-f]{{8}}")
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    groups: dict[str, list[tuple[str, Path]]] = {}
    for e in entries:
        m = leftover.fullmatch(e.name)
        if m and not e.is_symlink():
            groups.setdefault(m["name"], []).append((m["kind"], Path(e.path)))
    removed: list[Path] = []
    for target_name, items in sorted(groups.items()):
        target = directory / target_name

        def ctime(p: Path) -> float:
            try:
                return p.stat().st_ctime  # a rename updates it: the newest old copy was moved aside last
            except OSError:
                return 0.0

        olds = sorted((p for kind, p in items if kind == "old"), key=ctime, reverse=True)
        for p in olds + [p for kind, p in items if kind == "tmp"]:
            with _claimed(p) as ok:
                if not ok:
                    continue
                if p in olds and not os.path.lexists(target):
                    try:
                        os.rename(p, target)
                        fsync_dir(directory)
                        continue
                    except OSError:
                        pass  # the target appeared meanwhile: this copy is obsolete
                _remove(p)
                removed.append(p)
    return removed


# -------------------------------------------------------------------------------------- writing
@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes `path` (durably), on failure it vanishes.

    Leftovers of earlier killed saves of the same name are swept first (see `sweep_leftovers`).
    """
    path = Path(path)
    parent = ensure_dir(path.parent)
    sweep_leftovers(parent, path.name)
    tmp, tmp_fd = _new_tmp_dir(parent, path.name)
    old: Path | None = None
    old_fd: int | None = None
    try:
        try:
            yield tmp
            fsync_tree(tmp)  # every byte is on disk before the name can point at it
            if os.path.lexists(path):
                with contextlib.suppress(OSError):  # the lock only marks the old copy as live for sweepers
                    old_fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                    _try_lock(old_fd)
                old = parent / f".{path.name}.old-{_token()}"
                os.replace(path, old)
            os.replace(tmp, path)
            fsync_dir(parent)
        except BaseException:
            _remove(tmp)
            if old is not None and not os.path.lexists(path):  # moved aside, new one not in place: put back
                with contextlib.suppress(OSError):
                    os.replace(old, path)
                    old = None
                    fsync_dir(parent)
            raise
        if old is not None:
            _remove(old)
    finally:
        os.close(tmp_fd)
        if old_fd is not None:
            os.close(old_fd)


def _new_tmp_dir(parent: Path, name: str) -> tuple[Path, int]:
    """Create and lock `.NAME.tmp-XXXXXXXX`; the open, locked descriptor marks it as a live save."""
    for _ in range(_ATTEMPTS):
        tmp = parent / f".{name}.tmp-{_token()}"
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        fd = os.open(tmp, os.O_RDONLY)
        # a concurrent sweeper may have claimed it between mkdir and flock: then take another name
        if _try_lock(fd) is not False and _same_inode(tmp, fd):
            return tmp, fd
        os.close(fd)
    raise FileExistsError(f"cannot create a temporary directory for {parent / name}")


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO]:
    """Yield a file to fill, open on a temporary sibling `.NAME.tmp-XXXXXXXX`; when the block completes it
    is flushed, fsynced and renamed onto `path` (then the directory is fsynced), when it fails it is removed
    and `path` is left as it was. mode "w" (text in `encoding`, "\n" line ends on every platform) or "wb".
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    parent = ensure_dir(path.parent)
    sweep_leftovers(parent, path.name)
    for _ in range(_ATTEMPTS):
        tmp = parent / f".{path.name}.tmp-{_token()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        if _try_lock(fd) is not False and _same_inode(tmp, fd):
            break
        os.close(fd)
    else:
        raise FileExistsError(f"cannot create a temporary file for {path}")
    try:
        text = {"encoding": encoding, "newline": "\n"} if mode == "w" else {}
        with open(fd, mode, closefd=False, **text) as f:
            yield f
            f.flush()
            os.fsync(fd)
        os.replace(tmp, path)
        fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Replace the file `path` with `text` atomically and durably (temp file, fsync, rename, fsync dir)."""
    data = text.encode(encoding)
    with atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)
