"""Peak memory of one block of work, on GPU and on CPU.

CUDA: the caching allocator's own peak (``max_memory_allocated``), reset at entry.
CPU: torch's CPU allocator keeps no peak statistic, so a thread samples the process's
resident set (``/proc/self/statm``) every millisecond while the block runs; the peak is the
highest sample minus the level at entry. Large tensors are ``mmap``-ed by glibc and returned on
free, so the resident set follows live tensors; benchmarks set ``MALLOC_MMAP_THRESHOLD_``
(:data:`MMAP_THRESHOLD_ENV`) so that glibc does not raise the threshold after the first frees
and start keeping freed blocks on its heap.
"""

from __future__ import annotations

import os
import threading
import time

import torch

MMAP_THRESHOLD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the high-water mark is all there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """``with PeakMemory(device) as peak: ...``; then ``peak.bytes`` is the peak above the entry level."""

    def __init__(self, device: torch.device, interval_s: float = 0.001):
        self.device = device
        self.interval_s = interval_s
        self.bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0
        self._high = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._high = max(self._high, resident_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._high = resident_bytes()
            self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._stop.set()
        self._thread.join()
        self._high = max(self._high, resident_bytes())
        self.bytes = max(0, self._high - self._start)


def measure(fn, device: torch.device):
    """``(fn(), seconds, peak bytes)``."""
    started = time.perf_counter()
    with PeakMemory(device) as peak:
        out = fn()
    return out, time.perf_counter() - started, peak.bytes
