"""How the demo uses the machine: how many threads, the C allocator, and where the time goes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (None where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def busy_cores(window: float = 0.25) -> float | None:
    """How many cores other processes keep busy NOW: /proc/stat deltas over ``window`` seconds
    (this process sleeps meanwhile). None where /proc/stat cannot be read."""
    first = _cpu_ticks()
    if first is None:
        return None
    time.sleep(window)
    second = _cpu_ticks()
    if second is None or second[1] <= first[1]:
        return None
    cores = os.cpu_count() or 1
    return cores * (second[0] - first[0]) / (second[1] - first[1])


def choose_threads(requested: int, busy: float | None = None) -> int:
    """``requested`` if > 0; else the cores that are free right now (``busy_cores``), at least 1.

    Why: on an oversubscribed CPU torch's multi-threaded kernels wait for their slowest thread, and
    measured 5-10x slower than one thread. The load average is not used: it lags by a minute and still
    counts a command that has just finished."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    busy = busy_cores() if busy is None else busy
    if busy is None:
        return cores
    return max(1, min(cores, round(cores - busy)))


def keep_freed_memory(mmap_threshold: int = 32 << 20) -> bool:
    """glibc only: allocations up to ``mmap_threshold`` come from the heap, and freed heap memory is kept
    by the process instead of being returned to the system. Without this, tensors of a few MB that are
    freed and allocated again at every layer are mapped afresh each time (a page fault per 4 KB touched).
    Returns whether the settings took effect (False on other C libraries)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    ok = mallopt(m_mmap_threshold, mmap_threshold) == 1
    return bool(mallopt(m_trim_threshold, 1 << 30) == 1 and ok)


class Timer:
    """Wall time and this process's CPU time (user + system, all threads) per named phase."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()

    def run(self, name: str, fn: Callable, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0
        return out

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start

    @property
    def total_cpu(self) -> float:
        return time.process_time() - self.cpu_start
