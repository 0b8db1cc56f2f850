"""The relay between rank 0 and the driver: rank 0's records wait here until the driver drains
and writes them out.

A module of its own that imports nothing but Ray: the relay is an actor, a Python process Ray
starts for every attempt while the job's Ray Train processes start on the same cores; defined in
workers.session, its process imported torch for a buffer of dicts."""

from __future__ import annotations

import ray


class RelayBuffer:
    """Rank 0's records on their way to the driver, and how many of them the driver has made
    durable (written to metrics.jsonl). Plain Python so the handshake is testable without Ray;
    `MetricsRelay` is this class as an actor."""

    def __init__(self):
        self.records: list[dict] = []
        self.pushed = 0  # records ever pushed
        self.wanted = 0  # pushed count a checkpoint waits to see durable
        self.durable = 0  # records the driver has written out

    def push(self, records: list[dict]) -> None:
        self.records.extend(records)
        self.pushed += len(records)

    def mark(self) -> int:
        """Ask the driver to make everything pushed so far durable now; returns the count to
        wait for. Calls from one worker run in order, so this follows that worker's pushes."""
        self.wanted = max(self.wanted, self.pushed)
        return self.pushed

    def drain(self) -> tuple[list[dict], bool]:
        """The buffered records, and whether a checkpoint waits for them to be durable."""
        out, self.records = self.records, []
        return out, self.wanted > self.durable

    def ack(self, count: int) -> None:
        """The driver has written the first `count` records pushed."""
        self.durable = max(self.durable, count)

    def durable_count(self) -> int:
        return self.durable


# Buffers rank 0's records until the driver drains them; it outlives worker restarts.
MetricsRelay = ray.remote(num_cpus=0)(RelayBuffer)
