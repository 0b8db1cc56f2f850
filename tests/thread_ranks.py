"""Two 'ranks' as threads, for the pure parts of collective code: `reduce_sum` meets at a barrier
and hands both the sum, as an all-reduce would, without a process group."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def run_on_two_ranks(fn: Callable[[int, Callable], Any]) -> list[Any]:
    """fn(rank, reduce_sum) on two threads; returns [rank 0's result, rank 1's]."""
    barrier = threading.Barrier(2)
    box: list[Any] = [None, None]
    out: list[Any] = [None, None]

    def make_reduce(rank):
        def reduce_sum(t):
            box[rank] = t.clone()
            barrier.wait()
            total = box[0] + box[1]
            barrier.wait()  # neither rank overwrites its box before both have summed
            return total

        return reduce_sum

    def work(rank):
        out[rank] = fn(rank, make_reduce(rank))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out
