"""Overlapping reading, compute and writing in streaming defense: :class:`Prefetch` reads the next
tensors on a thread while the current one is transformed, :class:`Background` runs the writes (and
each shard's fsync and resume record) on another, in order. Both hand work over through a bounded
queue, so at most ``depth`` tensors wait on either side and memory stays bounded by a few tensors,
not by the checkpoint.

Torch kernels, file reads and writes and sha256 release the GIL, so the threads run in parallel with
the transform. An error on either thread is raised in the caller at its next hand-over (or on
leaving the ``with`` block); leaving the block by an exception stops both threads without running
what is still queued, so a killed or failed run leaves only what its resume records say is done.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

# tensors read ahead / waiting to be written: 1 each overlaps the three stages; more only buys
# slack against uneven tensors at the price of memory (one tensor each, up to the largest)
DEPTH = 1

_DONE = object()


class Prefetch:
    """Iterate ``(key, read(key))`` over ``keys`` in order, reading up to ``depth`` ahead on a thread."""

    def __init__(
        self, keys: Iterable[str], read: Callable[[str], Any], *, depth: int = DEPTH
    ) -> None:
        self._keys = list(keys)
        self._read = read
        self._queue: queue.Queue[Any] = queue.Queue()
        self._slots = threading.Semaphore(depth)  # read ahead, queued or in hand: at most depth
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="specdef-prefetch", daemon=True)

    def _run(self) -> None:
        try:
            for key in self._keys:
                while not self._slots.acquire(timeout=0.1):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                self._queue.put((key, self._read(key)))
        except BaseException as err:  # handed to the consumer, raised there
            self._queue.put(err)
            return
        self._queue.put(_DONE)

    def __enter__(self) -> Iterator[tuple[str, Any]]:
        self._thread.start()
        return self._iterate()

    def _iterate(self) -> Iterator[tuple[str, Any]]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            self._slots.release()
            yield item

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._stop.set()
        self._thread.join()  # at most the read in progress: the thread takes no new key


class Background:
    """Run submitted calls in submission order on one thread; :meth:`submit` blocks while ``depth``
    calls wait, :meth:`drain` waits for all of them. The first error is raised by the next
    :meth:`submit` or :meth:`drain` (or on leaving the block), and nothing submitted after it runs."""

    def __init__(self, *, depth: int = DEPTH) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="specdef-writer", daemon=True)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _DONE:
                    return
                if self._error is None and not self._stop.is_set():
                    fn, args = item
                    fn(*args)
            except BaseException as err:
                self._error = err
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._raise()
        self._queue.put((fn, args))

    def drain(self) -> None:
        """Wait until every submitted call has run; raise the first error."""
        self._queue.join()
        self._raise()

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            self._stop.set()  # a failed run: skip what is queued
        self._queue.put(_DONE)
        self._thread.join()
        if kind is None:
            self._raise()
