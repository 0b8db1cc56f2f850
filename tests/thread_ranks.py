"""Two 'ranks' as threads, for the pure parts of collective code: they meet at a barrier and
exchange one object each, as an all-gather would, without a process group."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Meeting:
    """Where two thread ranks exchange objects: `meet(rank, obj)` returns [rank 0's, rank 1's]
    to both. A rank that fails calls `abort()` so that the other does not wait forever."""

    def __init__(self, timeout: float | None = None):
        self.box: list[Any] = [None, None]
        self.gate = threading.Barrier(2, timeout=timeout)

    def meet(self, rank: int, obj: Any) -> list[Any]:
        self.box[rank] = obj
        self.gate.wait()
        out = list(self.box)
        self.gate.wait()  # neither rank overwrites its box before both have read
        return out

    def abort(self) -> None:
        self.gate.abort()


def run_threads(fn: Callable[[int], Any], meeting: Meeting) -> list[Any]:
    """fn(rank) on two threads; returns [rank 0's result, rank 1's]. The first error raised by
    either is raised here, after both threads ended (the other released by `meeting.abort()`)."""
    out: list[Any] = [None, None]
    errors: list[BaseException] = []

    def work(rank):
        try:
            out[rank] = fn(rank)
        except BaseException as e:
            errors.append(e)
            meeting.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def run_on_two_ranks(fn: Callable[[int, Callable], Any]) -> list[Any]:
    """fn(rank, reduce_sum) on two threads; returns [rank 0's result, rank 1's]."""
    meeting = Meeting()

    def make_reduce(rank):
        def reduce_sum(t):
            a, b = meeting.meet(rank, t.clone())
            return a + b

        return reduce_sum

    return run_threads(lambda rank: fn(rank, make_reduce(rank)), meeting)
