"""Concurrent reads by key sent as one query (service/store/read_batches.py), against a fake
database whose queries wait until the test lets them answer: which keys each query carried, when
it was sent, and what every read got back."""

from __future__ import annotations

import asyncio

import pytest

from service.store.job_rows import Batch
from service.store.read_batches import ReadBatches


class FakeStatement:
    def __init__(self, batch: Batch | None = None):
        self.batch = batch


MANY = FakeStatement()
ONE = FakeStatement(Batch(MANY, "id", 0))  # type: ignore[arg-type]


class FakeDb:
    """Rows (key, value) for the keys it holds; each query waits for `release()` when `gated`."""

    def __init__(self, table: dict[str, int], gated: bool = True):
        self.table, self.gated = table, gated
        self.sent: list[list[str]] = []  # the keys of each query, in the order they went out
        self.gates: list[asyncio.Event] = []
        self.fail: Exception | None = None

    async def fetch(self, stmt, params) -> list[tuple]:
        keys = [params["id"]] if stmt is ONE else params["keys"]
        assert stmt is ONE or len(keys) > 1, "a batch of one goes out as the single statement"
        self.sent.append(list(keys))
        snapshot = dict(self.table)  # what the query reads: the table as it was when sent
        gate = asyncio.Event()
        self.gates.append(gate)
        if self.gated:
            await gate.wait()
        if self.fail is not None:
            raise self.fail
        return [(k, snapshot[k]) for k in keys if k in snapshot]

    def release(self, i: int) -> None:
        self.gates[i].set()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def one_query_out(db: FakeDb, key: str) -> tuple[ReadBatches, asyncio.Future]:
    """Batches with room for one query out at a time, and a lone read of `key` out on it: the
    reads made next wait for the query after it."""
    batches = ReadBatches(db.fetch, ONE, max_in_flight=1)  # type: ignore[arg-type]
    first = asyncio.ensure_future(batches.rows(key))
    await settle()
    return batches, first


def test_a_lone_read_goes_out_at_once_as_the_single_statement():
    async def scenario():
        db = FakeDb({"a": 1}, gated=False)
        batches = ReadBatches(db.fetch, ONE)  # type: ignore[arg-type]
        assert await batches.rows("a") == [("a", 1)]
        assert await batches.rows("missing") == []
        assert db.sent == [["a"], ["missing"]]

    asyncio.run(scenario())


def test_reads_waiting_together_share_one_query_and_each_gets_its_own_rows():
    async def scenario():
        db = FakeDb({f"k{i}": i for i in range(5)})
        batches, first = await one_query_out(db, "k0")
        keys = [f"k{i % 5}" for i in range(20)] + ["missing"]
        rest = [asyncio.ensure_future(batches.rows(k)) for k in keys]
        await settle()
        assert db.sent == [["k0"]]  # the others wait for the query in flight
        db.release(0)
        await settle()
        assert db.sent == [["k0"], ["k0", "k1", "k2", "k3", "k4", "missing"]]  # each key once
        db.release(1)
        assert await first == [("k0", 0)]
        got = await asyncio.gather(*rest)
        assert got == [[(k, int(k[1:]))] if k != "missing" else [] for k in keys]

    asyncio.run(scenario())


def test_a_read_never_gets_an_answer_sent_before_it_began():
    """A change committed after a query went out, before the next read, shows in that read."""

    async def scenario():
        db = FakeDb({"a": 1})
        batches, early = await one_query_out(db, "a")
        db.table["a"] = 2  # committed while the first query is out
        late = asyncio.ensure_future(batches.rows("a"))
        await settle()
        db.release(0)
        await settle()
        db.release(1)
        assert (await early, await late) == ([("a", 1)], [("a", 2)])
        assert db.sent == [["a"], ["a"]]

    asyncio.run(scenario())


def test_at_most_max_in_flight_queries_and_max_keys_per_query():
    async def scenario():
        db = FakeDb({f"k{i}": i for i in range(10)})
        batches = ReadBatches(db.fetch, ONE, max_in_flight=2, max_keys=3)  # type: ignore[arg-type]
        reads = [asyncio.ensure_future(batches.rows(f"k{i}")) for i in range(10)]
        await settle()
        # k0 alone at once; then one batch of 3 gathers; the other 6 wait for a free slot
        assert db.sent == [["k0"], ["k1", "k2", "k3"]]
        db.release(0)
        await settle()
        assert db.sent[2] == ["k4", "k5", "k6"]
        db.release(1)
        db.release(2)
        await settle()
        assert db.sent[3:] == [["k7", "k8", "k9"]]
        db.release(3)
        assert await asyncio.gather(*reads) == [[(f"k{i}", i)] for i in range(10)]

    asyncio.run(scenario())


def test_a_failed_query_fails_its_reads_and_the_next_reads_go_on():
    async def scenario():
        db = FakeDb({"a": 1, "b": 2})
        batches, first = await one_query_out(db, "a")
        waiting = [asyncio.ensure_future(batches.rows(k)) for k in ("a", "b")]
        await settle()
        db.fail = ConnectionError("server gone")
        db.release(0)
        with pytest.raises(ConnectionError):
            await first
        await settle()
        db.release(1)
        for w in waiting:
            with pytest.raises(ConnectionError, match="server gone"):
                await w
        db.fail, db.gated = None, False
        assert await asyncio.wait_for(batches.rows("b"), 1) == [("b", 2)]
        assert db.sent == [["a"], ["a", "b"], ["b"]]

    async def ungated():
        db = FakeDb({}, gated=False)
        db.fail = ConnectionError("x")
        batches = ReadBatches(db.fetch, ONE)  # type: ignore[arg-type]
        with pytest.raises(ConnectionError):
            await batches.rows("a")

    asyncio.run(scenario())
    asyncio.run(ungated())


def test_a_read_cancelled_while_it_waits_leaves_the_others_their_answers():
    async def scenario():
        db = FakeDb({"a": 1, "b": 2})
        batches, first = await one_query_out(db, "a")
        gone, stays = asyncio.ensure_future(batches.rows("a")), asyncio.ensure_future(batches.rows("b"))
        await settle()
        gone.cancel()  # a client that disconnected
        db.release(0)
        await settle()
        db.release(1)
        assert (await first, await stays) == ([("a", 1)], [("b", 2)])
        assert gone.cancelled()

    asyncio.run(scenario())


def test_reads_waiting_when_the_loop_closes_are_cancelled_not_left_hanging():
    async def scenario():
        db = FakeDb({"a": 1, "b": 2})
        batches, first = await one_query_out(db, "a")
        waiting = asyncio.ensure_future(batches.rows("b"))
        await settle()
        db.release(0)
        await settle()  # the batch with "b" is out now, and will never answer
        (task,) = batches._tasks
        task.cancel()
        await settle()
        assert await first == [("a", 1)]
        assert waiting.cancelled()

    asyncio.run(scenario())


def test_a_statement_without_a_batch_form_is_refused():
    with pytest.raises(ValueError, match="no batch form"):
        ReadBatches(FakeDb({}).fetch, MANY)  # type: ignore[arg-type]
