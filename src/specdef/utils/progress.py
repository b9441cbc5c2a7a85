"""Progress bars for long work. Library code calls :func:`track`; only the CLI turns bars on,
so library users and tests see no output (library code never prints)."""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("specdef_progress", default=False)


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Turn progress bars on (to stderr) for the duration of the block."""
    token = _ENABLED.set(on)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def is_enabled() -> bool:
    return _ENABLED.get()


def track(items: Iterable[T], description: str, *, total: int | None = None) -> Iterator[T]:
    """Iterate ``items``, showing a bar with ETA on stderr when progress is enabled."""
    if not _ENABLED.get():
        yield from items
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(file=sys.stderr), transient=False) as bar:
        yield from bar.track(items, total=total, description=description)
