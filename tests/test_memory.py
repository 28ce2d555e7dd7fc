"""PeakMemory samples the resident set size during a block: a large allocation is seen; a block that sets a
new peak of the process gets it exactly from the high-water mark."""

import mmap
import sys
import time

import pytest
import torch

from lightning_flatness.memory import PeakMemory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/statm is Linux only")
def test_peak_memory_sees_a_temporary_allocation_that_is_freed_inside_the_block():
    with PeakMemory(torch.device("cpu"), interval=0.001) as before:
        pass
    with PeakMemory(torch.device("cpu"), interval=0.001) as peak:
        # 64 MiB of fresh pages from an anonymous mapping, touched and unmapped: a malloc'ed block could
        # reuse memory that earlier tests left resident in the allocator (libraries raise glibc's mmap
        # threshold), and then the resident set would rightly not grow
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\1" * len(block))
        time.sleep(0.2)  # many sampling intervals, even on a loaded machine
        block.close()
    assert peak.cuda_mb is None
    assert peak.rss_mb is not None and before.rss_mb is not None
    assert peak.rss_mb - before.rss_mb > 48  # the 64 MiB, freed before the block ended


def test_the_callback_logs_the_peak_memory_of_each_measurement():
    import math

    import pytorch_lightning as pl
    from callback_models import MLP, DataModule, quiet_trainer

    from lightning_flatness import SharpnessMonitor

    monitor = SharpnessMonitor(num_samples=32)
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer([monitor], max_epochs=1)
    trainer.fit(MLP(), DataModule())
    peak = monitor.history[-1]["peak_memory_mb"]
    assert math.isfinite(peak) and peak > 10  # at least the interpreter and torch are resident
    assert float(trainer.callback_metrics["sharpness/peak_memory_mb"]) == peak


_NEW_PEAK = """
import mmap, sys
import torch
from lightning_flatness.memory import PeakMemory, _rss_bytes, _rss_high_water_bytes

def touched(size):
    block = mmap.mmap(-1, size)
    block.write(b"\\1" * size)
    block.close()

extra = 64 * 2**20
touched(_rss_high_water_bytes() - _rss_bytes() + 2 * extra)  # an earlier peak of the process
with PeakMemory(torch.device("cpu"), interval=10.0) as below:  # no sample inside the block
    start = _rss_bytes()
    touched(extra)  # below the earlier peak: not a new high-water mark
with PeakMemory(torch.device("cpu"), interval=10.0) as above:
    start = _rss_bytes()
    touched(_rss_high_water_bytes() - start + extra)  # a new peak, 64 MiB above the last
    expected = _rss_high_water_bytes()
print(below.rss_mb * 2**20 - start, above.rss_mb * 2**20 - expected)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM of /proc/self/status is Linux only")
def test_a_block_that_sets_a_new_peak_of_the_process_gets_it_exactly_without_a_sample():
    """Interval of 10 s: no sample inside the blocks, only the high-water mark (``VmHWM``). A block whose
    allocation stays below an earlier peak of the process is a lower bound (its start and end); a block that
    sets a new peak gets that peak, however short. In a process of its own, whose earlier peaks are known."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", _NEW_PEAK], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    below, above = float(out[0]), float(out[1])
    assert below < 16 * 2**20  # the 64 MiB inside the block were not seen (resolution of the sampling)
    assert above == 0.0  # the new high-water mark, to the byte
