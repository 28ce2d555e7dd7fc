"""Peak memory of a block of code, without touching the process's own peak counters.

``torch.cuda.reset_peak_memory_stats`` and ``/proc/self/clear_refs`` would reset counters that the
user's own monitoring (Lightning's ``DeviceStatsMonitor``, a job scheduler) reads, so the peak is
*sampled* instead: a daemon thread reads the resident set size (``/proc/self/statm``, Linux) and the
CUDA allocator's current allocation every ``interval`` seconds while the block runs. Peaks shorter
than the interval can be missed; the result is a lower bound accurate to that resolution.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import torch

__all__ = ["PeakMemory"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """``with PeakMemory(device) as peak: ...``, then ``peak.rss_mb`` / ``peak.cuda_mb``: the largest
    sampled resident set size of the process (MiB; ``None`` off Linux) and, on a CUDA device, the
    largest sampled ``torch.cuda.memory_allocated`` (MiB; ``None`` elsewhere) during the block.

    Cost: one thread waking every ``interval`` seconds (default 5 ms) to read two numbers.
    """

    def __init__(self, device: Optional[torch.device] = None, interval: float = 0.005) -> None:
        self.device = device
        self.interval = interval
        self.rss_mb: Optional[float] = None
        self.cuda_mb: Optional[float] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()

    def _sample(self) -> None:
        rss = _rss_bytes()
        if rss is not None:
            self.rss_mb = max(self.rss_mb or 0.0, rss / 2**20)
        if self._cuda:
            allocated = torch.cuda.memory_allocated(self.device) / 2**20
            self.cuda_mb = max(self.cuda_mb or 0.0, allocated)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread = threading.Thread(target=self._run, name="lightning_flatness-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
