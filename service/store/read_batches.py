"""Reads of one row by key that wait at the same time, sent to the database as one query.

Why: on PostgreSQL a `GET /v1/jobs/{id}` spent much of its CPU in the API process on its read's
round trip (psycopg sending, waking on the answer, decoding), not on the row: 165 of 401 us,
where a `SELECT 1` alone cost 102 (`git show 8c426a1:bench/results/api/pg_read_cost.md`). Under
load, many GETs wait on the loop at once; one `WHERE id = ANY(...)` for all of them pays that
fixed cost once (27 us a read at 16 in flight: bench/results/api/pg_read_cost.md). At low load
nothing waits: a lone read goes out at once, as its own query on its own task, without the
task, future and array a batch of one would add.

What a read sees is unchanged: its query is sent after the read began (a read that arrives
while a query is in flight waits for the next), so it shows every change committed before the
request came, whoever made it, as a query of its own would.

At most `max_in_flight` queries of one statement are out at a time: when they are, new reads
gather for the next. A query carries at most `max_keys` keys; the rest wait for the next one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable

from service.store.job_rows import Statement

Fetch = Callable[[Statement, dict], Awaitable[list[tuple]]]

MAX_IN_FLIGHT = 2  # one query gathering while the other is out: batches at any load, no idle wait
MAX_KEYS = 256


class ReadBatches:
    """Concurrent reads of `one`, a statement with a `job_rows.Batch`, on one event loop."""

    def __init__(
        self, fetch: Fetch, one: Statement, max_in_flight: int = MAX_IN_FLIGHT, max_keys: int = MAX_KEYS
    ):
        if one.batch is None:
            raise ValueError("the statement has no batch form")
        self.fetch, self.one, self.batch = fetch, one, one.batch
        self.max_in_flight, self.max_keys = max_in_flight, max_keys
        self._waiting: dict[Hashable, list[asyncio.Future]] = {}
        self._in_flight = 0
        self._gathering = False  # a query is due to take the reads waiting now
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    async def rows(self, key: Hashable) -> list[tuple]:
        """The rows whose key column holds `key`, from a query sent after this call began."""
        if self._in_flight == 0 and not self._waiting:
            self._in_flight += 1
            try:
                return await self.fetch(self.one, {self.batch.key: key})
            finally:
                self._in_flight -= 1
                self._start()
        fut = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(fut)
        self._start()
        return await fut

    def _start(self) -> None:
        if self._gathering or not self._waiting or self._in_flight >= self.max_in_flight:
            return
        # The query takes its keys when its task first runs, not now: reads that arrive in the
        # meantime (the rest of this turn of the loop) go with it.
        self._gathering = True
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self) -> None:
        self._gathering = False
        keys = list(self._waiting)[: self.max_keys]
        batch = {k: self._waiting.pop(k) for k in keys}
        try:
            if len(keys) == 1:
                rows = await self.fetch(self.one, {self.batch.key: keys[0]})
            else:
                rows = await self.fetch(self.batch.many, {"keys": keys})
        except asyncio.CancelledError:  # the loop is closing: so are the reads that waited
            for futs in batch.values():
                for f in futs:
                    f.cancel()
            raise
        except Exception as e:  # each read fails as its own query would have
            for futs in batch.values():
                for f in futs:
                    if not f.done():  # a read cancelled while it waited is done
                        f.set_exception(e)
        else:
            by_key: dict[Hashable, list[tuple]] = {}
            for row in rows:
                by_key.setdefault(row[self.batch.column], []).append(row)
            for key, futs in batch.items():
                for f in futs:
                    if not f.done():
                        f.set_result(by_key.get(key, []))
        finally:
            self._in_flight -= 1
            self._start()
