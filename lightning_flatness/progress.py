"""A progress display for a long measurement inside a Lightning run, consistent with the Trainer's bar."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

__all__ = ["progress_reporter"]


def _noop(_: int = 1) -> None:
    return None


@contextmanager
def progress_reporter(
    trainer: Any, total: Optional[int], description: str
) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``, which moves a progress display by ``n`` steps of ``total``.

    Shown only on global rank 0 and only when the Trainer has an enabled progress bar:

    - with a ``RichProgressBar``, as one more task of its live display (removed afterwards);
    - with the default ``TQDMProgressBar`` (or any other), as a ``tqdm`` bar on stdout below
      Lightning's training and validation bars (``leave=False``: it disappears when done).

    Otherwise ``advance`` does nothing.
    """
    bar_callback = getattr(trainer, "progress_bar_callback", None)
    if bar_callback is None or getattr(bar_callback, "is_disabled", False) or not trainer.is_global_zero:
        yield _noop
        return
    rich = getattr(bar_callback, "progress", None)
    if rich is not None and callable(getattr(rich, "add_task", None)):
        task = rich.add_task(description, total=total)

        def advance_rich(n: int = 1) -> None:
            rich.update(task, advance=n)
            rich.refresh()

        try:
            yield advance_rich
        finally:
            rich.remove_task(task)
        return
    from tqdm import tqdm

    position = 2 * int(getattr(bar_callback, "process_position", 0)) + 2
    bar = tqdm(
        total=total,
        desc=description,
        position=position,
        leave=False,
        dynamic_ncols=True,
        file=sys.stdout,
        unit="batch",
    )
    try:
        yield bar.update
    finally:
        bar.close()
