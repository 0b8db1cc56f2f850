"""What an idle SSE stream costs the API: `python -m bench.load.sse_cost`.

Streams of a job with nothing new to send share one poll of the database per job every 0.5 s
(api/sse.py: `JobHeads`); before that each stream polled on its own, twice per poll, so the cost
grew with the viewers. Here the API (one uvicorn worker, SQLite, scheduler off so the jobs stay
queued and their streams stay open and idle) holds N idle streams over 4 jobs while its process
CPU is measured over a fixed window; N goes 0, 100, 200, 400 (default), in interleaved rounds.
Writes bench/out/sse_cost/{table.md,results.json,sse_cost.png}.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from api.sse import POLL_SECONDS
from bench.api.run import TOKEN, start_api
from bench.common import conditions, machine, markdown_table, median, results_dir, save_json
from bench.load import clients as cl

SPEC = {"name": "idle", "model": {"name": "mlp"}, "data": {"name": "digits"}}


async def hold(url: str, jobs: list[str], n: int, ready: asyncio.Event, stop: asyncio.Event) -> int:
    """Open n streams (one connection each) and read them until `stop`; returns how many opened."""
    opened = 0

    async def one(i: int) -> None:
        nonlocal opened
        headers = {"Authorization": f"Bearer {TOKEN}"}
        timeout = httpx.Timeout(30, read=60)
        path = f"/v1/jobs/{jobs[i % len(jobs)]}/events"
        async with (
            cl.client(base_url=url, headers=headers, timeout=timeout) as c,
            c.stream("GET", path) as r,
        ):
            r.raise_for_status()
            opened += 1
            if opened == n:
                ready.set()
            async for _ in r.aiter_lines():  # the queued event, then pings every 15 s
                pass

    if n == 0:
        ready.set()
    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return opened


async def measure(url: str, pid: int, jobs: list[str], n: int, seconds: float) -> float:
    ready, stop = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold(url, jobs, n, ready, stop))
    await asyncio.wait_for(ready.wait(), 120)
    await asyncio.sleep(3)  # let the burst of opening settle
    proc = psutil.Process(pid)
    c0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
    await asyncio.sleep(seconds)
    c1, t1 = sum(proc.cpu_times()[:2]), time.monotonic()
    stop.set()
    assert await holder == n, "not every stream opened"
    return 100 * (c1 - c0) / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[0, 100, 200, 400])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=15)
    args = ap.parse_args()
    out = results_dir("sse_cost")
    cpu: dict[int, list[float]] = {n: [] for n in args.streams}
    with tempfile.TemporaryDirectory(prefix="slimtrain-sse-") as tmp:
        proc, url = start_api(Path(tmp), {"SLIMTRAIN_RUN_SCHEDULER": "false"})
        try:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
                jobs = [c.post("/v1/jobs", json={**SPEC, "name": f"idle-{i}"}).json()["id"] for i in range(4)]
            for r in range(args.rounds):
                # Alternate the order so a drift in the machine's load does not favour one N.
                for n in args.streams if r % 2 == 0 else args.streams[::-1]:
                    cpu[n].append(asyncio.run(measure(url, proc.pid, jobs, n, args.seconds)))
                    print(f"round {r}: {n} idle streams -> API CPU {cpu[n][-1]:.1f}% of a core", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    ns = np.array(args.streams, dtype=float)
    meds = np.array([median(cpu[n]) for n in args.streams])
    per100 = float(np.polyfit(ns, meds, 1)[0] * 100)
    # At most one read of each followed job per poll, however many streams follow it.
    reads = {n: min(n, len(jobs)) / POLL_SECONDS for n in args.streams}
    rows = [[n, median(cpu[n]), ", ".join(f"{x:.1f}" for x in cpu[n]), reads[n]] for n in args.streams]
    table = markdown_table(
        ["idle SSE streams", "API CPU % of one core (median)", "per round", "DB polls/s (bound)"], rows
    )
    note = f"fit: {per100:.1f}% of a core per 100 idle streams; {args.rounds} rounds x {args.seconds:g} s"
    m = machine()
    (out / "table.md").write_text(f"{conditions(m)}\n{note}.\n\n{table}\n")
    save_json(
        out / "results.json",
        {"machine": m, "args": vars(args), "cpu_percent": cpu, "per_100_streams": per100},
    )
    _plot(cpu, per100, out / "sse_cost.png")
    print(table)
    print(note)


def _plot(cpu: dict, per100: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for n, xs in cpu.items():
        ax.plot([n] * len(xs), xs, "k.", ms=6)
    ns = sorted(cpu)
    ax.plot(ns, [median(cpu[n]) for n in ns], "-o", color="#c44e52", label=f"median ({per100:.1f}% per 100)")
    ax.set_xlabel("idle SSE streams open")
    ax.set_ylabel("API process CPU (% of one core)")
    ax.set_title("cost of idle SSE streams (no events to send)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
