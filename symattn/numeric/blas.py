"""Control of the BLAS thread pool that NumPy uses, while symattn runs its own worker threads.

OpenBLAS keeps its worker threads spinning for a while after each matrix product, waiting for the
next one. Worker threads that symattn starts right after a product then compete with a spinning
thread for the cores: on a 2-core machine exp(−u) on two threads took 107 ms after a product and
73 ms without one. Setting the pool to one thread stops the spinning at once.

Only OpenBLAS builds that export ``openblas_set_num_threads`` (with any prefix or suffix, as in
NumPy's own scipy_openblas64_ wheels) are found, through the shared objects this process has
mapped (Linux). Elsewhere single_threaded_blas does nothing, which costs speed only.
"""

from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

_lock = threading.Lock()


@lru_cache(maxsize=1)
def _openblas_pools() -> tuple[tuple[object, object], ...]:
    """Return (get_num_threads, set_num_threads) for every loaded OpenBLAS (NumPy's, PyTorch's, …)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return ()
    pools = []
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("", ""), ("scipy_", "64_"), ("", "64_"), ("scipy_", "")):
            getter = getattr(library, f"{prefix}openblas_get_num_threads{suffix}", None)
            setter = getattr(library, f"{prefix}openblas_set_num_threads{suffix}", None)
            if getter is not None and setter is not None:
                getter.restype = ctypes.c_int
                setter.argtypes = [ctypes.c_int]
                pools.append((getter, setter))
                break
    return tuple(pools)


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the block with every OpenBLAS limited to one thread, then restore their thread counts."""
    with _lock:
        restore = []
        for get, set_ in _openblas_pools():
            previous = get()
            if previous > 1:
                set_(1)
                restore.append((set_, previous))
    try:
        yield
    finally:
        with _lock:
            for set_, previous in restore:
                set_(previous)
