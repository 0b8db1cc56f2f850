"""Which API process leads: a lease row in the job database.

Any number of API processes serve HTTP; one at a time, the leader, runs the scheduler, the
reconciler, metrics ingest and the sweeps loop. Leadership is the row `leader_lease` (migration
0003): holder, epoch, expiry. Why a row and not a PostgreSQL advisory lock: it works the same on
SQLite (several processes on one machine) and PostgreSQL, it says who leads and since when to
anyone who reads it, and an advisory lock lives as long as one database connection, so a leader
whose connection dropped (a pooler, a network blip) would lose it without knowing, while another
took it: the lease's expiry is a time both sides can reason about.

- **Acquire:** a conditional UPDATE that succeeds only when the lease has expired (or its holder
  is known dead, below); it sets the holder, the next epoch and an expiry `ttl` ahead. The row
  is read `FOR UPDATE` first (PostgreSQL) and every write transaction on SQLite takes the write
  lock up front, so two contenders serialise and exactly one wins.
- **Renew:** every `renew_interval`, an UPDATE conditional on holder, epoch and an unexpired
  lease. One that fails ends the leadership: a later acquisition starts a new epoch.
- **Time:** expiry is kept in the database's clock (PostgreSQL's `clock_timestamp()`; SQLite is
  one machine, its own clock), so replicas on different hosts need not agree on the time. The
  leader's own view is a local monotonic deadline, `ttl - margin` after the moment it *started*
  its last successful renewal: that is never later than the expiry the database holds, so a
  leader stops acting (`holds()` false) before any other process may acquire, even when it was
  paused or its renewals hang.
- **Fencing:** the scheduler checks `holds()` before each action, and the one write that claims
  a job for a Ray submission (queued -> starting, `Store.admit`) runs `fence()` in its own
  transaction: the lease row is locked and must still name this holder and epoch, unexpired.
  A deposed leader that wakes up mid-tick therefore cannot admit a job; every other write of the
  loops is a compare-and-set on the job row (the state machine) or conditional on what it
  replaces (ingest), so it cannot apply twice either.
- **Bound:** when the leader dies, its lease expires at most `ttl` after its last renewal, and a
  follower tries every `renew_interval`: another process leads within `ttl + renew_interval` of
  the death. A leader that shuts down cleanly releases the lease (its expiry set to now), so
  a rolling update hands over within one `renew_interval`.
- **Same machine:** a holder id names its host, process and PID namespace; a contender on the
  same kernel and namespace that finds the holder's process gone takes over at once (a killed
  `slimtrain serve` restarted on one machine does not wait out the lease). Elsewhere, and when
  the process may be alive, only the expiry counts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Float, Integer, String, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column

from service.store.db import Database
from service.store.models import Base

log = logging.getLogger(__name__)

LEASE = "leader"


class LeaderLease(Base):
    __tablename__ = "leader_lease"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    epoch: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[float] = mapped_column(Float)
    renewed_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class LeaseView:
    holder: str
    epoch: int
    acquired_at: float
    renewed_at: float
    expires_at: float


def db_clock(s: Session) -> float:
    """Now, in seconds since the epoch, by the database's clock (PostgreSQL), else this machine's."""
    if s.get_bind().dialect.name == "postgresql":
        return float(s.execute(text("SELECT EXTRACT(EPOCH FROM clock_timestamp())")).scalar_one())
    return time.time()


# --- who a holder is ------------------------------------------------------------------------------


def _machine() -> str:
    """This kernel and PID namespace: processes that share it can see each other's PIDs."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
        ns = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        return "?"
    return f"{boot}.{ns}"


def process_identity() -> str:
    """`host/pid/machine/nonce`: readable, and unique even when a PID is reused."""
    return f"{socket.gethostname()}/{os.getpid()}/{_machine()}/{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) acts no more
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def dead_here(holder: str, machine: str | None = None, alive: Callable[[int], bool] = _pid_alive) -> bool:
    """True only when `holder` ran in this kernel and PID namespace and its process is gone."""
    parts = holder.rsplit("/", 3)
    if len(parts) != 4 or not parts[1].isdigit():
        return False
    here = machine if machine is not None else _machine()
    return here != "?" and parts[2] == here and not alive(int(parts[1]))


# --- the lease ------------------------------------------------------------------------------------


class Lease:
    """This process's side of the lease. `tick()` renews or acquires and says whether this
    process leads; `holds()` answers without I/O. `clock(session)` is the database's time,
    `local()` a monotonic clock (both injectable: tests drive them value by value)."""

    def __init__(
        self,
        db: Database,
        ttl: float,
        *,
        name: str = LEASE,
        holder: str | None = None,
        margin: float | None = None,
        clock: Callable[[Session], float] = db_clock,
        local: Callable[[], float] = time.monotonic,
        takeover_dead_local: bool = True,
        is_dead: Callable[[str], bool] = dead_here,
    ):
        self.db, self.ttl, self.name = db, ttl, name
        self.holder = holder or process_identity()
        # Covers what a monotonic clock and the database's may drift apart within one ttl.
        self.margin = min(1.0, ttl / 10) if margin is None else margin
        self.clock, self.local = clock, local
        self.takeover_dead_local, self.is_dead = takeover_dead_local, is_dead
        self.epoch: int | None = None
        self._deadline = -math.inf
        self._lock = threading.Lock()

    def holds(self) -> bool:
        """Whether this process may act as the leader now: it holds an epoch and its local
        deadline has not passed (that deadline comes before the lease's expiry)."""
        return self.epoch is not None and self.local() < self._deadline

    def tick(self) -> bool:
        with self._lock:
            if self.epoch is not None and self._renew():
                return True
            return self._acquire()

    def _renew(self) -> bool:
        started = self.local()
        with self.db.write() as s:
            now = self.clock(s)
            res = s.execute(
                update(LeaderLease)
                .where(
                    LeaderLease.name == self.name,
                    LeaderLease.holder == self.holder,
                    LeaderLease.epoch == self.epoch,
                    LeaderLease.expires_at > now,
                )
                .values(renewed_at=now, expires_at=now + self.ttl)
            )
            ok = res.rowcount == 1
        if ok:
            self._deadline = started + self.ttl - self.margin
        else:
            log.warning("leader lease: lost epoch %s (expired or taken over)", self.epoch)
            self.epoch, self._deadline = None, -math.inf
        return ok

    def _free(self, holder: str, expires_at: float, now: float) -> bool:
        return expires_at <= now or (self.takeover_dead_local and bool(holder) and self.is_dead(holder))

    def _acquire(self) -> bool:
        started = self.local()
        with self.db.read() as s:  # most tries find a live lease: they take no write lock
            row = s.get(LeaderLease, self.name)
            if row is not None and not self._free(row.holder, row.expires_at, self.clock(s)):
                return False
        with self.db.write() as s:
            now = self.clock(s)
            row = self._row(s)
            if row is None:
                s.add(
                    LeaderLease(
                        name=self.name,
                        holder=self.holder,
                        epoch=1,
                        acquired_at=now,
                        renewed_at=now,
                        expires_at=now + self.ttl,
                    )
                )
                epoch = 1
            else:
                # Plain values: the UPDATE below refreshes `row` in the session.
                old, was, until = row.holder, row.epoch, row.expires_at
                if not self._free(old, until, now):
                    return False
                res = s.execute(
                    update(LeaderLease)
                    .where(LeaderLease.name == self.name, LeaderLease.epoch == was)
                    .values(
                        holder=self.holder,
                        epoch=was + 1,
                        acquired_at=now,
                        renewed_at=now,
                        expires_at=now + self.ttl,
                    )
                )
                if res.rowcount != 1:
                    return False
                epoch = was + 1
                if old and until > now:
                    log.warning("leader lease: took over from %s, whose process is gone", old)
        self.epoch, self._deadline = epoch, started + self.ttl - self.margin
        log.info("leader lease: %s leads (epoch %d)", self.holder, epoch)
        return True

    def _row(self, s: Session) -> LeaderLease | None:
        return s.execute(
            select(LeaderLease).where(LeaderLease.name == self.name).with_for_update()
        ).scalar_one_or_none()

    def fence(self, s: Session) -> bool:
        """Inside a write transaction: whether the lease is still this process's. The row stays
        locked until that transaction ends (PostgreSQL; SQLite's writer holds the database), so
        no takeover can commit between this check and the caller's write."""
        if not self.holds():
            return False
        row = self._row(s)
        return (
            row is not None
            and row.holder == self.holder
            and row.epoch == self.epoch
            and row.expires_at > self.clock(s)
        )

    def release(self) -> None:
        """Give the lease up at once (a clean shutdown): a follower acquires at its next try."""
        with self._lock:
            if self.epoch is None:
                return
            epoch, self.epoch, self._deadline = self.epoch, None, -math.inf
            with self.db.write() as s:
                s.execute(
                    update(LeaderLease)
                    .where(
                        LeaderLease.name == self.name,
                        LeaderLease.holder == self.holder,
                        LeaderLease.epoch == epoch,
                    )
                    .values(expires_at=self.clock(s))
                )

    def view(self) -> LeaseView | None:
        with self.db.read() as s:
            row = s.get(LeaderLease, self.name)
            if row is None:
                return None
            return LeaseView(row.holder, row.epoch, row.acquired_at, row.renewed_at, row.expires_at)


class Leadership:
    """Campaigns for the lease every `interval` on a daemon thread; runs `on_elected` when this
    process becomes the leader and `on_deposed` when it stops being one (its lease lost or, on
    `stop()`, released)."""

    def __init__(
        self,
        lease: Lease,
        interval: float,
        on_elected: Callable[[], None],
        on_deposed: Callable[[], None],
    ):
        self.lease, self.interval = lease, interval
        self.on_elected, self.on_deposed = on_elected, on_deposed
        self.acting = False  # the loops run here
        self.last_error: str | None = None
        self.campaigns = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def leading(self) -> bool:
        return self.acting and self.lease.holds()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        # The first campaign before serving: a lone process (and the tests) leads from the start.
        self.campaign()
        self._thread = threading.Thread(target=self._run, name="slimtrain-leader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.campaign()

    def campaign(self) -> None:
        try:
            leads = self.lease.tick()
            self.last_error = None
        except SQLAlchemyError as e:  # the database is away: lead on only until the deadline
            self.last_error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            log.warning("leader lease: %s", self.last_error)
            leads = self.lease.holds()
        self.campaigns += 1
        if leads and not self.acting:
            self.acting = True
            self.on_elected()
        elif not leads and self.acting:
            self.acting = False
            self.on_deposed()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        if self.acting:
            self.acting = False
            self.on_deposed()
        with contextlib.suppress(SQLAlchemyError):
            self.lease.release()
