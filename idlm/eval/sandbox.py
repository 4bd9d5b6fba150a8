"""A best-effort sandbox for running model-written Python (HumanEval tests), one subprocess per program.

Why it exists: `idlm eval humaneval` executes code a language model wrote. That code is untrusted and
often wrong in harmful ways (endless loops, huge allocations, stray file writes, forks). This module
runs one program per call and reports what happened, without letting the program hang, exhaust or
scribble over the machine that evaluates it:

    from idlm.eval.sandbox import run_python
    r = run_python("assert 1 + 1 == 2", timeout=5)
    r.status  # "passed" | "failed" | "timeout" | "killed"

What a run gets:
- a separate `python -I` process (no PYTHON* variables, no user site, neither the script's directory
  nor the cwd on sys.path) in a new session and process group, stdin closed;
- a fresh temporary directory as cwd, HOME and TMPDIR, deleted afterwards;
- a clean environment: no proxies, no credentials, no variables of the evaluating process;
- resource limits set in the child before exec (`preexec_fn`, `resource.setrlimit`): RLIMIT_CPU
  (about the timeout), RLIMIT_AS (`memory_mb`), RLIMIT_NPROC (`max_processes`: forks fail),
  RLIMIT_FSIZE (`max_file_mb`), RLIMIT_NOFILE (64), RLIMIT_CORE (0); hard limits equal soft limits;
- a wall-clock timeout after which the whole process group is killed (SIGKILL); the group is also
  killed after a normal exit, so nothing the program left behind in it survives;
- an in-process guard installed before the program runs (this file is the child's launcher: `_guard`):
  no sockets (`socket.socket`, `create_connection`, `getaddrinfo`, ... raise PermissionError); no writes
  outside the temp directory (`open`/`io.open`/`os.open`/`io.FileIO` in a write mode, `os.mkdir`;
  `os.remove`/`unlink`/`rmdir`/`rename`/`replace` work inside it only); no process, file-system or
  signal calls that could hurt the host (`os.system`, `os.fork`, `os.exec*`, `os.spawn*`,
  `os.posix_spawn`, `subprocess.Popen`/`run`/..., hence `multiprocessing`, `os.kill`/`killpg`,
  `os.chmod`/`chown`, `os.chdir`, `os.symlink`/`link`, `os.truncate`, `os.removedirs`,
  `shutil.rmtree`/`move`/`chown`, `os._exit`, `os.setsid`, ...; patched in both `os` and `posix`);
  `ctypes` and the subinterpreter modules cannot be imported.

Status: "passed" means the program ran to its end and the process exited with status 0. A program
that calls `sys.exit()`/`exit()` (any code) did not reach its end and is "failed", so an accidental
`exit(0)` in generated code cannot fake a pass. "timeout": the wall clock (or RLIMIT_CPU) ran out.
"killed": a signal ended it (SIGSEGV, SIGKILL at the hard CPU limit, ...). A file write above
RLIMIT_FSIZE raises OSError in Python (it ignores SIGXFSZ), so it ends "failed" unless caught.

What this does NOT give (be honest about it): the guard runs inside the program's own interpreter,
so a determined attacker can undo it (reach the saved originals through gc or frames, use a C
extension that opens files or sockets itself, e.g. sqlite3). What the OS enforces whatever the
program does is: the rlimits, the kill of the process group, the deletion of the temporary
directory and the clean environment. Everything else (no network, no writes outside the directory,
no forks when running as root) rests on the guard. Reading files is not restricted (the program can
read whatever the user running the evaluation can). There is no network namespace. A process that
escapes the process group with `setsid` (after getting past the guard) is not killed. When the
evaluation runs as root, RLIMIT_NPROC is not enforced by the kernel and file permissions protect
nothing. For code you do not trust at all, run the evaluation as an unprivileged user inside a
container or VM without network (e.g. `docker run --network none --read-only ...`).

Parallel runs: `run_many` runs programs concurrently, at most `workers` (default: CPU count) at a
time; each still gets its own process, directory and limits.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

STATUSES = ("passed", "failed", "timeout", "killed")
TAIL_BYTES = 4096  # how much of stdout / stderr a Result keeps (the end)
PROGRAM_FILE = "program.py"  # the program's file inside its temporary directory
_EXIT_CALLED = 3  # the launcher's exit status when the program raised SystemExit


@dataclass(frozen=True)
class Result:
    status: str  # one of STATUSES
    returncode: int | None  # the process's exit status (negative: the signal that ended it)
    stdout_tail: str
    stderr_tail: str
    seconds: float  # wall time of the child process
    pid: int  # the child's pid, which is also its process group and session id

    @property
    def passed(self) -> bool:
        return self.status == "passed"


class _Tail:
    """Reads a pipe to its end in a thread, keeping only the last `limit` bytes (a program that prints
    for ever cannot fill the evaluating process's memory). `text()` never hangs: a process that left
    the group (past the guard) and still holds the pipe is simply no longer read."""

    def __init__(self, pipe, limit: int = TAIL_BYTES):
        self.pipe, self.fd, self.limit, self.buf = pipe, pipe.fileno(), limit, b""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        import select

        try:
            while not self.stop.is_set():
                if not select.select([self.fd], [], [], 0.05)[0]:
                    continue
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    return
                self.buf = (self.buf + chunk)[-self.limit:]
        except (OSError, ValueError):
            pass

    def text(self, grace: float = 1.0) -> str:
        self.thread.join(grace)
        self.stop.set()
        self.thread.join()
        self.pipe.close()
        return self.buf.decode("utf-8", errors="replace")


def _limits(timeout: float, memory_mb: int, max_processes: int, max_file_mb: int) -> list[tuple[int, int]]:
    import resource

    cpu = max(1, math.ceil(timeout)) + 1  # the wall clock normally fires first
    limits = [(resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory_mb << 20),
              (resource.RLIMIT_NPROC, max_processes), (resource.RLIMIT_FSIZE, max_file_mb << 20),
              (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)]
    return limits


def _preexec(limits: list[tuple[int, int]]):
    """The function run in the forked child before exec: only setrlimit calls on precomputed values
    (nothing that takes a lock another thread of the parent could hold at fork time)."""
    import resource

    setrlimit = resource.setrlimit

    def apply() -> None:
        for what, value in limits:
            setrlimit(what, (value, value))

    return apply


def _environment(tmp: str) -> dict[str, str]:
    """A clean environment: nothing inherited (no proxies, tokens, PYTHON* variables)."""
    return {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "TMP": tmp, "TEMP": tmp,
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0"}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_tree(path: str) -> None:
    """Delete the temporary directory even if the program made parts of it unreadable."""
    def make_writable(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p) or p, stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable)
    else:
        shutil.rmtree(path, onerror=make_writable)
    if os.path.exists(path):  # a directory left without permissions: open it up and try once more
        for root, dirs, _files in os.walk(path):
            for d in dirs:
                try:
                    os.chmod(os.path.join(root, d), stat.S_IRWXU)
                except OSError:
                    pass
        shutil.rmtree(path, ignore_errors=True)


def run_python(program: str, timeout: float = 10.0, memory_mb: int = 1024, *, max_processes: int = 16,
               max_file_mb: int = 16, python: str | None = None) -> Result:
    """Run `program` (Python source) in a fresh sandboxed process; see the module docstring."""
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout!r}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be at least 64 (the interpreter needs it), got {memory_mb!r}")
    tmp = os.path.realpath(tempfile.mkdtemp(prefix="idlm-sandbox-"))
    try:
        with open(os.path.join(tmp, PROGRAM_FILE), "w", encoding="utf-8") as f:
            f.write(program)
        cmd = [python or sys.executable, "-I", os.path.abspath(__file__), PROGRAM_FILE]
        limits = _limits(timeout, memory_mb, max_processes, max_file_mb)
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=tmp, env=_environment(tmp), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                close_fds=True, preexec_fn=_preexec(limits))
        out, err = _Tail(proc.stdout), _Tail(proc.stderr)
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        seconds = time.monotonic() - start
        _kill_group(proc.pid)  # the program, and anything it left running in its group
        proc.wait()
        stdout, stderr = out.text(), err.text()
        rc = proc.returncode
        if timed_out or rc == -signal.SIGXCPU:
            status = "timeout"
        elif rc == 0:
            status = "passed"
        elif rc < 0:
            status = "killed"
        else:
            status = "failed"
        return Result(status, rc, stdout, stderr, round(seconds, 4), proc.pid)
    finally:
        _remove_tree(tmp)


def run_many(programs: list[str], timeout: float = 10.0, memory_mb: int = 1024, workers: int | None = None,
             **options) -> list[Result]:
    """`run_python` over many programs, at most `workers` (default and bound: the CPUs this process may
    use) at a time; results in program order."""
    from concurrent.futures import ThreadPoolExecutor

    if not programs:
        return []
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(workers or cpus, cpus, len(programs)))
    # threads only wait on their child processes: the programs themselves run in separate processes
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: run_python(p, timeout, memory_mb, **options), programs))


# ---------------------------------------------------------------------------- the child side


def _guard(root: str) -> None:
    """Install the in-process guard in the child (before the program runs): see the module docstring."""
    import builtins
    import io

    root = os.path.realpath(root)

    def refuse(what: str):
        def blocked(*_args, **_kwargs):
            raise PermissionError(f"{what} is disabled in the idlm sandbox")
        blocked.__name__ = what.rsplit(".", 1)[-1]
        return blocked

    def inside(path) -> bool:
        if isinstance(path, int):  # an already-open descriptor (e.g. open(1, "w"))
            return True
        full = os.path.realpath(os.fsdecode(os.fspath(path)))
        return full == root or full.startswith(root + os.sep)

    def check_write(path, what: str) -> None:
        if not inside(path):
            raise PermissionError(f"{what}: writing outside the sandbox directory is not allowed: {path!r}")

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    real_fileio = io.FileIO

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in str(mode) for c in "wax+"):
            check_write(file, "open")
        return real_open(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            if dir_fd is not None:
                raise PermissionError("os.open with dir_fd for writing is disabled in the idlm sandbox")
            check_write(path, "os.open")
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def guarded_mkdir(path, mode=0o777, *, dir_fd=None):
        if dir_fd is not None:
            raise PermissionError("os.mkdir with dir_fd is disabled in the idlm sandbox")
        check_write(path, "os.mkdir")
        return real_mkdir(path, 0o700)  # never a directory the cleanup cannot enter

    class GuardedFileIO(real_fileio):
        def __init__(self, file, mode="r", closefd=True, opener=None):
            if any(c in str(mode) for c in "wax+"):
                check_write(file, "io.FileIO")
            super().__init__(file, mode, closefd, opener)

    def inside_only(name: str, nargs: int):
        """os.remove/unlink/rmdir (one path) and rename/replace (two): only on paths inside the sandbox."""
        real = getattr(os, name)

        def guarded(*args, **kwargs):
            if any(k in kwargs for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
                raise PermissionError(f"os.{name} with a dir_fd is disabled in the idlm sandbox")
            for path in args[:nargs]:
                check_write(path, f"os.{name}")
            return real(*args, **kwargs)
        guarded.__name__ = name
        return guarded

    import _io
    import posix

    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO
    guarded = {"open": guarded_os_open, "mkdir": guarded_mkdir}
    guarded.update({name: inside_only(name, 1) for name in ("remove", "unlink", "rmdir")})
    guarded.update({name: inside_only(name, 2) for name in ("rename", "replace")})
    for name in ("system", "popen", "fork", "forkpty", "vfork", "_exit", "abort", "kill", "killpg", "setsid",
                 "setpgid", "setpgrp", "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp",
                 "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp",
                 "spawnvpe", "posix_spawn", "posix_spawnp", "removedirs", "renames", "chmod", "fchmod", "lchmod",
                 "chown", "fchown", "lchown", "chroot", "chdir", "fchdir", "link", "symlink", "truncate",
                 "ftruncate", "mkfifo", "mknod", "putenv", "unsetenv", "setuid", "seteuid", "setreuid", "setresuid",
                 "setgid", "setegid", "setregid", "setresgid", "setgroups", "nice", "plock"):
        guarded[name] = refuse(f"os.{name}")
    for name, func in guarded.items():
        for module in (os, posix):  # os re-exports posix's functions: patch both names
            if hasattr(module, name):
                setattr(module, name, func)

    import shutil as shutil_mod
    import socket
    import subprocess as subprocess_mod

    for name in ("rmtree", "move", "chown"):
        setattr(shutil_mod, name, refuse(f"shutil.{name}"))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess_mod, name, refuse(f"subprocess.{name}"))
    try:
        import _posixsubprocess

        _posixsubprocess.fork_exec = refuse("_posixsubprocess.fork_exec")
    except ImportError:
        pass

    class NoSocket:
        def __new__(cls, *_args, **_kwargs):
            raise PermissionError("network access is disabled in the idlm sandbox")

    import _socket

    for module in (socket, _socket):
        for name in ("socket", "SocketType", "create_connection", "create_server", "socketpair", "fromfd",
                     "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(module, name):
                setattr(module, name, NoSocket)
    # ctypes calls any C function; a subinterpreter gets fresh, unguarded copies of os/posix
    for name in ("ctypes", "_ctypes", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters",
                 "_interpchannels", "_interpqueues"):
        sys.modules[name] = None  # importing it raises ImportError


def _child_main(program_file: str) -> int:
    """The launcher: read the program, install the guard, run the program as __main__."""
    import builtins
    import types

    path = os.path.abspath(program_file)
    with open(path, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, path, "exec")  # a syntax error ends the run as "failed" (status 1)
    _guard(os.getcwd())
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    except SystemExit as e:
        sys.stderr.write(f"SystemExit({e.code!r}): the program called exit() before reaching its end\n")
        return _EXIT_CALLED
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
