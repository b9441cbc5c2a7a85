"""specdef.streaming.overlap: order kept, read-ahead bounded, errors of either thread raised in the
caller, and nothing queued runs after a failure."""

from __future__ import annotations

import threading
import time

import pytest

from specdef.streaming import overlap


def test_prefetch_keeps_order_and_reads_at_most_depth_ahead() -> None:
    reads: list[int] = []
    taken: list[int] = []

    def read(key: str) -> int:
        reads.append(int(key))
        return int(key) * 10

    with overlap.Prefetch([str(i) for i in range(6)], read, depth=2) as items:
        for key, value in items:
            time.sleep(0.02)  # let the reader run ahead as far as it may
            assert value == int(key) * 10
            taken.append(int(key))
            assert len(reads) <= len(taken) + 2  # the one in hand, and 2 ahead at most
    assert taken == list(range(6)) and reads == taken


def test_prefetch_raises_the_readers_error_in_order_and_stops() -> None:
    def read(key: str) -> str:
        if key == "b":
            raise OSError("disk gone")
        return key

    seen = []
    with pytest.raises(OSError, match="disk gone"), overlap.Prefetch("abc", read) as items:
        for key, _ in items:
            seen.append(key)
    assert seen == ["a"]
    # leaving early stops the reader before it reads everything
    reads: list[str] = []
    with overlap.Prefetch([str(i) for i in range(100)], lambda k: reads.append(k)) as items:
        next(items)
    assert len(reads) <= 3


def test_background_runs_in_order_bounded_and_raises_the_first_error() -> None:
    done: list[int] = []
    gate = threading.Event()

    def slow(i: int) -> None:
        gate.wait(5)
        done.append(i)

    with overlap.Background(depth=1) as background:
        background.submit(slow, 0)  # running (blocked on the gate)
        background.submit(slow, 1)  # queued: the queue is full now
        start = time.perf_counter()
        threading.Timer(0.2, gate.set).start()
        background.submit(slow, 2)  # blocks until the writer catches up
        assert time.perf_counter() - start >= 0.15
        background.drain()
    assert done == [0, 1, 2]

    ran: list[int] = []

    def fail() -> None:
        raise OSError("no space left")

    with pytest.raises(OSError, match="no space left"), overlap.Background() as background:
        background.submit(fail)
        background.drain()
    with pytest.raises(RuntimeError, match="caller failed"), overlap.Background() as background:
        background.submit(time.sleep, 0.1)
        background.submit(ran.append, 1)
        raise RuntimeError("caller failed")
    assert ran == []  # a failed run does not go on writing what it had queued
