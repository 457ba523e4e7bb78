"""Process-wide CPU settings the torch engine makes once, at its first start: one thread per physical core, and an
allocator that keeps freed memory for the next evaluation."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
from pathlib import Path

import torch


def physical_cores() -> int | None:
    """Physical cores among the CPUs this process may run on (Linux); None where the topology is unknown."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None
    groups = set()
    for cpu in cpus:
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            groups.add(path.read_text().strip())
        except OSError:
            return None
    return len(groups) or None


@functools.cache
def use_physical_cores() -> None:
    """One intra-op thread per physical core: a second hardware thread on the same core adds contention for the
    FMA units without adding throughput. An explicit OMP_NUM_THREADS (or torch.set_num_threads) wins."""
    cores = physical_cores()
    if cores and not os.environ.get("OMP_NUM_THREADS") and torch.get_num_threads() > cores:
        torch.set_num_threads(cores)


@functools.cache
def keep_freed_memory() -> None:
    """Make glibc keep freed blocks for reuse instead of unmapping them (process-wide, once).

    Activations of a few tens of megabytes are above glibc's mmap threshold, so each evaluation would map them
    anew and fault in every page, in kernel time (BENCHMARKS.md); from the second evaluation on, the same sizes are
    reused from the heap. The cost is a heap that does not shrink.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
