"""Test-session settings: one intra-op thread (tiny models on a shared 2-core machine run many
times faster single-threaded, and timings of concurrent tests stop interfering)."""

import torch

torch.set_num_threads(1)
