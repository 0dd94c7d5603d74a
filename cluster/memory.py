"""A process's own memory and CPU accounting, and giving freed heap back to the kernel (Linux, glibc).

Light on purpose (no Ray, no torch): workers call it per unit, and benchmarks and tests read it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children (the ffmpeg coders)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child_cpu_seconds() -> float:
    """User + system CPU seconds of this process's waited-for children alone (in a worker: the ffmpeg
    segment encoders; decoding runs in-process)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


def memory_mib() -> dict[str, float]:
    """This process's resident memory now, in MiB, split as Linux counts it (``/proc/self/status``):
    ``anon`` (its heap: private), ``file`` (mapped files: libraries, weights), ``shmem`` (shared memory it
    maps: pages of Ray's object store it has touched), and ``hwm``, the peak of their sum. Empty off Linux."""
    fields = {"VmHWM": "hwm", "VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in fields:
                    out[fields[name]] = round(int(value.split()[0]) / 1024, 1)  # kB
    except OSError:
        return {}
    return out


def _libc_malloc_trim():
    """glibc's ``malloc_trim``, or None under another C library (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_MALLOC_TRIM = _libc_malloc_trim()


def can_trim() -> bool:
    return _MALLOC_TRIM is not None


def trim_heap() -> bool:
    """Hand the free pages of every malloc arena back to the kernel (glibc ``malloc_trim(0)``); True if
    any were. A worker calls it when a unit ends: glibc keeps the pages of freed frames and activations
    for reuse, and as their holes fragment with every unit run, a worker's resident memory would grow with
    the length of the job. Costs milliseconds, and page faults when the heap grows again."""
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False
