"""Peak memory of a block of code, without touching the process's own peak counters.

``torch.cuda.reset_peak_memory_stats`` and ``/proc/self/clear_refs`` would reset counters that the
user's own monitoring (Lightning's ``DeviceStatsMonitor``, a job scheduler) reads. They are only *read*:
the process's high-water marks (``VmHWM`` of ``/proc/self/status``, Linux; ``torch.cuda.
max_memory_allocated``) at the block's start and end. Where the block raised one, its peak is that new mark,
exactly. Otherwise the block stayed below an earlier peak of the process, and its own peak is *sampled*: a
daemon thread reads the resident set size (``/proc/self/statm``) and the CUDA allocator's current allocation
every ``interval`` seconds while the block runs; peaks shorter than the interval can be missed, so that
value is a lower bound accurate to that resolution.

Each sample takes the interpreter's lock from the measuring thread, which costs process time on a short
measurement (measured: benchmarks/RESULTS.md, round 28), hence the default of 25 ms: the high-water marks
give the new peaks exactly whatever the interval.
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


def _rss_high_water_bytes() -> Optional[int]:
    """The process's peak resident set size so far (``VmHWM``), None off Linux."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """``with PeakMemory(device) as peak: ...``, then ``peak.rss_mb`` / ``peak.cuda_mb``: the largest
    sampled resident set size of the process (MiB; ``None`` off Linux) and, on a CUDA device, the
    largest sampled ``torch.cuda.memory_allocated`` (MiB; ``None`` elsewhere) during the block.

    Exact where the block raised the process's high-water mark, else sampled (module docstring).

    Cost: one thread waking every ``interval`` seconds (default 25 ms) to read two numbers, and two reads of
    the high-water marks.
    """

    def __init__(self, device: Optional[torch.device] = None, interval: float = 0.025) -> None:
        self.device = device
        self.interval = interval
        self.rss_mb: Optional[float] = None
        self.cuda_mb: Optional[float] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._marks: tuple[Optional[int], Optional[int]] = (None, None)  # high-water marks at entry
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

    def _high_water(self) -> tuple[Optional[int], Optional[int]]:
        cuda = torch.cuda.max_memory_allocated(self.device) if self._cuda else None
        return _rss_high_water_bytes(), cuda

    def __enter__(self) -> PeakMemory:
        self._marks = self._high_water()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="lightning_flatness-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        (rss_before, cuda_before), (rss_after, cuda_after) = self._marks, self._high_water()
        # a new high-water mark was set inside the block: it is the block's peak
        if rss_before is not None and rss_after is not None and rss_after > rss_before:
            self.rss_mb = max(self.rss_mb or 0.0, rss_after / 2**20)
        if cuda_before is not None and cuda_after is not None and cuda_after > cuda_before:
            self.cuda_mb = max(self.cuda_mb or 0.0, cuda_after / 2**20)
