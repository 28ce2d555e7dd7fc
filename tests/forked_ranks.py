"""Run one function per rank in forked processes (gloo tests on CPU) and collect what each saved.

Forked, not spawned: the test process has torch and the library imported already, and a fresh
interpreter per rank would spend most of the test importing them.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Callable

import pytest
import torch


def fork_ranks(tmp_path: Path, world: int, target: Callable[..., None], extra: tuple, what: str) -> list:
    """Start ``target(rank, world, store_path, out_path, *extra)`` for every rank, wait (120 s at most),
    fail the test on a timeout or a non-zero exit, and return each rank's ``torch.load(out_path)``."""
    context = multiprocessing.get_context("fork")
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [
        context.Process(target=target, args=(r, world, str(tmp_path / "store"), str(outs[r]), *extra))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    if any(p.is_alive() for p in procs):
        for p in procs:
            p.kill()
        pytest.fail(f"{what} timed out (deadlock?)")
    assert [p.exitcode for p in procs] == [0] * world, f"a {what} failed; its traceback is above"
    return [torch.load(o, weights_only=False) for o in outs]
