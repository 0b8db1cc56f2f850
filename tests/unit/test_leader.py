"""The leader lease (service/leader.py) on a real SQLite database, value by value, with the
database's clock and the processes' monotonic clocks injected: acquire, renew, expiry,
takeover within ttl + one renew interval, fencing of a paused leader, release, and a dead
holder on the same machine."""

from __future__ import annotations

import pydantic
import pytest

from service.leader import Leadership, Lease, dead_here
from service.limits import Resources
from service.settings import Settings
from service.store.db import Database
from service.store.repo import NewJob, Store

TTL, MARGIN = 10.0, 1.0


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def db(self, _session) -> float:
        return self.t

    def local(self) -> float:
        return self.t


@pytest.fixture
def db(tmp_path):
    d = Database(f"sqlite:///{tmp_path / 'lease.db'}")
    d.upgrade()
    yield d
    d.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def lease(db, clock, holder, **kw) -> Lease:
    kw.setdefault("local", clock.local)
    return Lease(db, TTL, holder=holder, margin=MARGIN, clock=clock.db, **kw)


def test_acquire_renew_expire_and_take_over(db, clock):
    a, b = lease(db, clock, "a"), lease(db, clock, "b")
    assert a.view().epoch == 0 and a.view().expires_at == 0.0  # the migration's expired row
    assert a.tick() and a.epoch == 1
    v = a.view()
    assert (v.holder, v.epoch, v.acquired_at, v.renewed_at, v.expires_at) == ("a", 1, 1000.0, 1000.0, 1010.0)
    assert not b.tick() and b.epoch is None and not b.holds()

    clock.t = 1002.0
    assert a.tick() and a.epoch == 1  # renewed: same epoch, expiry moves on
    assert (a.view().renewed_at, a.view().expires_at) == (1002.0, 1012.0)
    assert a.holds()

    # a stops renewing (killed). Its own deadline, ttl - margin after its last renewal began,
    # comes before the expiry another process waits for.
    clock.t = 1010.999
    assert a.holds()
    clock.t = 1011.0  # 1002 + ttl - margin
    assert not a.holds()
    clock.t = 1011.999
    assert not b.tick()  # still a's: 1012 not reached
    clock.t = 1012.0
    assert b.tick() and b.epoch == 2 and b.holds()
    v = b.view()
    assert (v.holder, v.epoch, v.acquired_at, v.expires_at) == ("b", 2, 1012.0, 1022.0)
    # a comes back: its renewal fails (another epoch), and it cannot acquire a live lease
    assert not a.tick() and a.epoch is None and not a.holds()


@pytest.mark.parametrize("offset", [0.0, 0.3, 1.0, 1.7])
def test_takeover_within_ttl_plus_one_renew_interval(db, clock, offset):
    """a renews every 2 s and dies at 1005; b, out of step by `offset`, tries every 2 s: b leads
    no later than 1005 + ttl + 2, and no earlier than a's lease expires."""
    interval = 2.0
    a, b = lease(db, clock, "a"), lease(db, clock, "b")
    events = sorted(
        [(1000.0 + i * interval, "a") for i in range(3)]
        + [(1000.0 + offset + i * interval, "b") for i in range(12)]
    )
    killed, led = 1005.0, None
    for t, who in events:
        clock.t = t
        if who == "a" and t < killed:
            assert a.tick()
        elif who == "b" and b.tick():
            led = t
            break
    last_renewal = 1004.0
    assert led is not None
    assert last_renewal + TTL <= led <= killed + TTL + interval


def test_a_paused_leader_stops_acting_before_another_starts_and_its_claim_is_fenced(db, clock, tmp_path):
    store = Store(db)
    job, _ = store.create_job(NewJob("job-1", "t", "j", {"name": "j"}, 0, 1))
    slow = Clock(clock.t)  # a's monotonic clock, stopped while a is paused
    a = lease(db, clock, "a", local=slow.local)
    b = lease(db, clock, "b")
    assert a.tick()
    clock.t += 30  # a paused for 30 s (slow.t did not move): b takes over
    assert b.tick() and b.epoch == 2
    assert a.holds()  # a's paused view still says yes...
    # ...but its claim of a job checks the lease row in the claiming transaction: refused
    with db.write() as s:
        assert not a.fence(s)
    assert store.admit(job, "job-1", Resources(1.0, 0.0), fence=a.fence) is None
    assert store.get_job("job-1").state == "queued" and store.attempts_of("job-1") == []
    # the leader's claim goes through, once
    admitted = store.admit(job, "job-1", Resources(1.0, 0.0), fence=b.fence)
    assert admitted is not None and admitted[0].state == "starting"
    assert store.admit(job, "job-1", Resources(1.0, 0.0), fence=b.fence) is None  # version moved on
    assert [x.submission_id for x in store.attempts_of("job-1")] == ["job-1"]
    # with a monotonic clock that ran on, a pause past the deadline is seen without I/O
    slow.t = clock.t
    assert not a.holds()


def test_release_hands_over_at_the_next_try(db, clock):
    a, b = lease(db, clock, "a"), lease(db, clock, "b")
    assert a.tick() and not b.tick()
    clock.t += 1
    a.release()
    assert a.epoch is None and not a.holds() and a.view().expires_at == 1001.0
    assert b.tick() and b.epoch == 2


def test_a_dead_holder_on_this_machine_is_replaced_at_once(db, clock):
    gone = {"a"}
    a = lease(db, clock, "a")
    b = lease(db, clock, "b", is_dead=lambda h: h in gone)
    cautious = lease(db, clock, "c", is_dead=lambda h: h in gone, takeover_dead_local=False)
    assert a.tick()
    assert not cautious.tick()  # waits out the lease
    assert b.tick() and b.epoch == 2  # long before 1010
    gone.add("b")
    assert not cautious.tick()


def test_dead_here_needs_the_same_machine_and_a_gone_process():
    assert dead_here("h/123/m1/n0nce", machine="m1", alive=lambda pid: pid != 123)
    assert not dead_here("h/123/m1/n0nce", machine="m1", alive=lambda pid: True)
    assert not dead_here("h/123/m2/n0nce", machine="m1", alive=lambda pid: False)  # another host
    assert not dead_here("h/123/?/n0nce", machine="?", alive=lambda pid: False)  # unknown machine
    assert not dead_here("garbage", machine="m1", alive=lambda pid: False)


def test_leadership_starts_and_stops_the_loops_with_the_lease(db, clock):
    calls: list[str] = []
    a = lease(db, clock, "a")
    la = Leadership(a, 2.0, lambda: calls.append("elected"), lambda: calls.append("deposed"))
    la.campaign()
    assert calls == ["elected"] and la.leading
    clock.t += 2
    la.campaign()
    assert calls == ["elected"]  # renewed: nothing to do
    clock.t += TTL + 1  # renewals missed (paused): another takes the lease
    assert lease(db, clock, "b").tick()
    assert not la.leading
    la.campaign()
    assert calls == ["elected", "deposed"] and not la.acting


def test_the_renew_interval_must_leave_room_before_expiry(tmp_path):
    with pytest.raises(pydantic.ValidationError, match="leader_renew_interval_s"):
        Settings(data_dir=tmp_path, leader_lease_ttl_s=3, leader_renew_interval_s=2)
    s = Settings(data_dir=tmp_path, leader_lease_ttl_s=3, leader_renew_interval_s=0.5)
    assert (s.leader_lease_ttl_s, s.leader_renew_interval_s) == (3, 0.5)
