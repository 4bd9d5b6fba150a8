"""A process pool for the pipeline's pure-Python CPU work (reading, hashing and `ast`-parsing files).

Why processes: parsing a few hundred MB of source with `ast` is GIL-bound (about 3 MB/s per core),
so 16 cores need 16 processes. Why fork: workers start in milliseconds and inherit the imported
modules; they only run pure functions of their arguments (no locks, no tokenizers, no torch), which
is the case where forking a process that has other threads (torch's pool, tqdm's monitor) is safe —
so Python 3.12's warning about forking a multi-threaded process is silenced here, and only here.
Results come back in input order (`imap`), so nothing downstream depends on scheduling.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import warnings
from typing import Callable, Iterable, Iterator


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


@contextlib.contextmanager
def process_pool(workers: int) -> Iterator[Callable[[Callable, Iterable], Iterator]]:
    """Yield an ordered `imap(fn, items)`: the builtin `map` for workers <= 1, else a pool's imap."""
    if workers <= 1:
        yield map
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        pool = multiprocessing.get_context(method).Pool(workers)
    try:
        yield lambda fn, items: pool.imap(fn, items, chunksize=32)
    finally:
        pool.terminate()
        pool.join()
