"""The load: N simulated dashboard users, each following one job's SSE stream while it polls
job status (and now and then the job list and the metric series), plus one submitter that keeps
a few small training jobs live. Every response is recorded: route, status, latency, and when.

httpx.AsyncClient per user, as a browser has its own connections: one shared client would funnel
400 connections through one pool. All of them share one TLS context (`client`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field

import httpx

TERMINAL = {"succeeded", "failed", "cancelled"}
LIVE = ["queued", "starting", "running"]
STATUS, LIST, METRICS = "GET /v1/jobs/{id}", "GET /v1/jobs", "GET /v1/jobs/{id}/metrics"
EVENTS, SUBMIT, CANCEL = "GET /v1/jobs/{id}/events (headers)", "POST /v1/jobs", "POST /v1/jobs/{id}/cancel"
_TLS = ssl.create_default_context()


def client(**kw) -> httpx.AsyncClient:
    """An httpx client with the shared TLS context. Each client otherwise loads the CA bundle
    when it is made, on this process's event loop: 200 users made at once held it for seconds,
    and the requests already in flight (the first job list and /metrics scrape) were recorded as
    taking that long, the 3.5-3.7 s maxima of every run in bench/results/load_ab/."""
    return httpx.AsyncClient(verify=_TLS, **kw)


PROM = "GET /metrics"
# A stream of a job that ended this long ago and is still open is stuck: the API ends a stream
# after the job's final state event, and streams poll the database every 0.5 s.
STUCK_AFTER_S = 10.0


@dataclass
class Recorder:
    t0: float = field(default_factory=time.monotonic)
    codes: Counter = field(default_factory=Counter)  # (route, status) -> count
    times: dict[str, array] = field(default_factory=dict)  # route -> when (s since t0)
    lats: dict[str, array] = field(default_factory=dict)  # route -> latency (s)
    errors: Counter = field(default_factory=Counter)  # (route, exception type) -> count
    errors_by_group: Counter = field(default_factory=Counter)  # client group -> count
    requests_by_group: Counter = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    events_per_s: Counter = field(default_factory=Counter)  # second since t0 -> SSE events received
    streams: Counter = field(default_factory=Counter)  # outcome -> count
    # Driver's timestamp of a metric record -> its arrival over SSE, for records written while
    # the stream was open (replayed history excluded): flush + ingest + fan-out + delivery.
    delivery_lag: array = field(default_factory=lambda: array("d"))
    stream_problems: list[str] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def add(self, route: str, status: int, latency: float) -> None:
        self.codes[(route, status)] += 1
        self.times.setdefault(route, array("d")).append(self.now())
        self.lats.setdefault(route, array("d")).append(latency)

    def error(self, route: str, exc: BaseException, group: str = "") -> None:
        self.errors[(route, type(exc).__name__)] += 1
        self.errors_by_group[group] += 1
        if len(self.error_samples) < 40:
            self.error_samples.append(f"{self.now():.1f}s {route} [{group}]: {type(exc).__name__}: {exc}")

    def problem(self, kind: str, text: str) -> None:
        self.streams[kind] += 1
        if len(self.stream_problems) < 20:
            self.stream_problems.append(f"{self.now():.1f}s {kind}: {text}")


class JobPool:
    """What the clients know of the jobs: the submitter and the monitor keep it current."""

    def __init__(self):
        self.state: dict[str, str] = {}
        self.ended_at: dict[str, float] = {}  # monotonic time the job was first seen terminal

    def update(self, job_id: str, state: str) -> None:
        self.state[job_id] = state
        if state in TERMINAL:
            self.ended_at.setdefault(job_id, time.monotonic())

    def live(self) -> list[str]:
        return [j for j, s in self.state.items() if s not in TERMINAL]

    def pick(self, rng: random.Random) -> str | None:
        # Mostly the jobs that train now (what a dashboard watches), sometimes a finished one.
        live = self.live()
        if live and rng.random() < 0.8:
            return rng.choice(live)
        return rng.choice(list(self.state)) if self.state else None


async def timed(rec: Recorder, http: httpx.AsyncClient, route: str, method: str, url: str, group="", **kw):
    t = time.perf_counter()
    rec.requests_by_group[group] += 1
    try:
        r = await http.request(method, url, **kw)
    except httpx.HTTPError as e:
        rec.error(route, e, group)
        return None
    rec.add(route, r.status_code, time.perf_counter() - t)
    return r


async def poll(rec: Recorder, http, pool: JobPool, interval: float, rng: random.Random, group: str):
    """Status mostly; the job list and a page of metrics as a dashboard's other pages would."""
    await asyncio.sleep(rng.uniform(0, interval))  # spread the users' phases
    while True:
        job = pool.pick(rng)
        roll = rng.random()
        if job is None or roll < 0.1:
            await timed(rec, http, LIST, "GET", "/v1/jobs", group, params={"limit": 20})
        elif roll < 0.2:
            await timed(rec, http, METRICS, "GET", f"/v1/jobs/{job}/metrics", group, params={"limit": 100})
        else:
            await timed(rec, http, STATUS, "GET", f"/v1/jobs/{job}", group)
        await asyncio.sleep(interval * rng.uniform(0.5, 1.5))


@dataclass
class Stream:
    job: str
    opened: float  # monotonic
    last_byte: float  # monotonic; pings (every 15 s) count
    last_id: int = 0
    flagged: bool = False


class OpenStreams:
    """Streams open right now, to find the ones still open long after their job ended, and to
    say what they were doing (still pinged by the server? which event last?)."""

    def __init__(self):
        self.by_key: dict[int, Stream] = {}

    def stuck(self, pool: JobPool) -> list[Stream]:
        now = time.monotonic()
        return [
            st
            for st in self.by_key.values()
            if st.job in pool.ended_at and now - max(pool.ended_at[st.job], st.opened) > STUCK_AFTER_S
        ]


async def follow(rec: Recorder, http, pool: JobPool, opened: OpenStreams, rng, group: str):
    """Follow a job's events from the start (as the dashboard's job page does) until the stream
    ends, then another job's. Checks ids rise by one and the stream ends on a final state."""
    key = id(asyncio.current_task())
    while True:
        job = pool.pick(rng)
        if job is None:
            await asyncio.sleep(0.5)
            continue
        t, opened_at = time.perf_counter(), time.time()
        last_state, event = None, None
        st = Stream(job, time.monotonic(), time.monotonic())
        rec.requests_by_group[group] += 1
        try:
            # Read timeout 40 s: the API sends a ping every 15 s on an idle stream.
            timeout = httpx.Timeout(30, read=40)
            async with http.stream("GET", f"/v1/jobs/{job}/events", timeout=timeout) as r:
                rec.add(EVENTS, r.status_code, time.perf_counter() - t)
                if r.status_code != 200:
                    await r.aread()
                    await asyncio.sleep(1)
                    continue
                opened.by_key[key] = st
                async for line in r.aiter_lines():
                    st.last_byte = time.monotonic()
                    if line.startswith("id:"):
                        eid = int(line[3:])
                        if eid != st.last_id + 1:
                            rec.problem("id gap or repeat", f"job {job}: id {eid} after {st.last_id}")
                        st.last_id = eid
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                        rec.events_per_s[int(rec.now())] += 1
                    elif line.startswith("data:") and event == "state":
                        last_state = json.loads(line[5:]).get("state")
                    elif line.startswith("data:") and event == "metric":
                        stamp = json.loads(line[5:]).get("time")
                        if stamp is not None and stamp >= opened_at:
                            rec.delivery_lag.append(time.time() - stamp)
        except httpx.HTTPError as e:
            rec.error(EVENTS, e, group)
            await asyncio.sleep(1)
            continue
        finally:
            opened.by_key.pop(key, None)
        if st.flagged:  # how long it stayed open after its job ended, now that it is over
            late = time.monotonic() - max(pool.ended_at.get(job, st.opened), st.opened)
            rec.problem(
                "stuck stream ended", f"job {job}: ended {late:.1f} s after its job, last id {st.last_id}"
            )
        if last_state in TERMINAL:
            rec.streams["ended on a final state"] += 1
        else:
            rec.problem("ended before a final state", f"job {job}: last state {last_state}, id {st.last_id}")
        # A person looks at the finished job before opening another; without this pause all of
        # a job's followers would reconnect in the same instant, a herd no dashboard produces.
        await asyncio.sleep(rng.uniform(1, 5))


async def user(rec, base_url, token, pool, opened, interval, seed, keepalive: float):
    """One dashboard user. `keepalive`: how long its client keeps an idle connection for reuse
    (httpx's default is 5 s, the same as uvicorn's server-side timeout)."""
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(keepalive_expiry=keepalive)
    group = f"client keep-alive {keepalive:g} s"
    async with client(base_url=base_url, headers=headers, timeout=30, limits=limits) as http:
        await asyncio.gather(
            poll(rec, http, pool, interval, rng, group), follow(rec, http, pool, opened, rng, group)
        )


async def keep_jobs(rec, base_url, token, pool: JobPool, spec: dict, live_target: int, submitted: list):
    """Keeps `live_target` jobs queued or training, and the pool's states current (one list
    request a second; the users' own polls do not feed the pool)."""
    headers = {"Authorization": f"Bearer {token}"}
    async with client(base_url=base_url, headers=headers, timeout=30) as http:
        n = 0
        while True:
            r = await timed(rec, http, LIST, "GET", "/v1/jobs", params={"state": LIVE, "limit": 200})
            if r is not None and r.status_code == 200:
                live = {j["id"] for j in r.json()["items"]}
                for j in pool.live():
                    if j not in live:  # it ended: ask for its final state
                        rj = await timed(rec, http, STATUS, "GET", f"/v1/jobs/{j}")
                        if rj is not None and rj.status_code == 200:
                            pool.update(j, rj.json()["state"])
                while len(pool.live()) < live_target:
                    n += 1
                    body = {**spec, "name": f"{spec['name']}-{n}"}
                    rs = await timed(rec, http, SUBMIT, "POST", "/v1/jobs", json=body)
                    if rs is None or rs.status_code != 201:
                        break
                    job = rs.json()
                    submitted.append(job["id"])
                    pool.update(job["id"], job["state"])
            await asyncio.sleep(1)


async def scrape(rec, base_url, token: str, sizes: list, every: float):
    """Prometheus' view: the size of /metrics tells whether per-job series pile up."""
    headers = {"Authorization": f"Bearer {token}"}  # the metrics token, not an API token
    async with client(base_url=base_url, headers=headers, timeout=30) as http:
        while True:
            r = await timed(rec, http, PROM, "GET", "/metrics")
            if r is not None and r.status_code == 200:
                sizes.append((rec.now(), len(r.content)))
            await asyncio.sleep(every)


async def cancel_live(rec, base_url, token, pool: JobPool) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with client(base_url=base_url, headers=headers, timeout=30) as http:
        for j in pool.live():
            r = await timed(rec, http, CANCEL, "POST", f"/v1/jobs/{j}/cancel")
            with contextlib.suppress(Exception):
                pool.update(j, r.json()["state"])


async def final_states(base_url, token, ids: list[str]) -> dict[str, dict]:
    headers = {"Authorization": f"Bearer {token}"}
    async with client(base_url=base_url, headers=headers, timeout=30) as http:
        out = {}
        for j in ids:
            try:
                r = await http.get(f"/v1/jobs/{j}")
                out[j] = r.json() if r.status_code == 200 else {"state": f"HTTP {r.status_code}"}
            except httpx.HTTPError as e:
                out[j] = {"state": "unknown", "error": {"message": f"{type(e).__name__}: {e}"}}
        return out
