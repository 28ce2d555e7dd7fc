"""PeakMemory samples the resident set size during a block: a large allocation is seen."""

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
