"""Load and soak of the API while jobs train (issue 8, item 7). Not part of the test suite.

    .venv/bin/python -m bench.load --seconds 30               # smoke
    .venv/bin/python -m bench.load                            # 200 users for 120 s
    .venv/bin/python -m bench.load --soak-minutes 10          # the same load for 10 min, RSS sampled
    .venv/bin/python -m bench.load --db postgres              # on a throwaway PostgreSQL server

Starts `slimtrain serve` (embedded Ray head with token auth, SQLite or `--db postgres` (a server
of its own on loopback, as the tests start one), a temporary data dir, one
API token) and keeps `--live-jobs` small digits jobs queued or training (submitting a new one when
one ends). Meanwhile `--clients` simulated dashboard users each follow one job's SSE stream from
its first event to its last (then another job's) and poll the job's status about every
`--poll-interval` seconds (one poll in ten lists the jobs, one in ten reads a page of metrics).
Every response's status and latency is recorded per route; SSE streams are checked for id gaps
and for ending on the job's final state, and a stream left open 10 s after its job ended is
stuck. The API process's RSS, threads and fds are sampled every `--sample-seconds`.

Exits 1 on any 5xx, connection error or timeout, SSE problem, failed job, or (soak of 5 min or
more) an RSS slope above report.MAX_SLOPE_MIB_PER_MIN after warm-up. Writes table.md,
results.json and a plot to bench/out/load/ (bench/out/load_soak/ with --soak-minutes; a
`_postgres` suffix on PostgreSQL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import secrets
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import conditions, machine, markdown_table, results_dir, save_json
from bench.load import clients as cl
from bench.load import gc_pauses, report
from bench.load.server import sample, serve

SPEC = {
    "name": "load",
    "model": {"name": "mlp"},
    "data": {"name": "digits"},
    "train": {"epochs": 12},  # 22 steps an epoch: 264 steps, 20-40 s a job here
    "parallel": {"strategy": "ddp", "workers": 1},  # two jobs train at once on 2 CPUs
    "compression": {
        "pruning": {
            "schedule": "cubic",
            "final_sparsity": 0.8,
            "start_step": 20,
            "end_step": 200,
            "frequency": 20,
        }
    },
    "checkpoint": {"every_steps": 100, "keep": 2},
}


async def loop_lag(lags: list[float], every: float = 0.1) -> None:
    """How late this process's event loop wakes: the share of the measured latencies that is
    the load generator's own, not the server's."""
    while True:
        t = time.perf_counter()
        await asyncio.sleep(every)
        lags.append(time.perf_counter() - t - every)


async def sampler(pid, rec, pool, opened, samples, every: float) -> None:
    while True:
        s = sample(pid)
        s["t"] -= rec.t0
        s["open_streams"] = len(opened.by_key)
        s["live_jobs"] = len(pool.live())
        samples.append(s)
        now = time.monotonic()
        for st in opened.stuck(pool):
            if not st.flagged:
                st.flagged = True
                ended = now - pool.ended_at[st.job]
                rec.problem(
                    "stuck stream",
                    f"job {st.job} ended {ended:.1f} s ago (stream opened {now - st.opened:.1f} s ago), "
                    f"stream open; last id {st.last_id}, last byte {now - st.last_byte:.1f} s ago",
                )
        await asyncio.sleep(every)


async def drive(server, args, seconds: float) -> dict:
    # This process's own collector pauses delay every response it is reading at the time; they
    # are recorded, and shortened as `slimtrain serve` shortens the API's (api.app: freeze_gc).
    gen_pauses: list = []
    gc_pauses.install(gen_pauses.append)
    gc.collect()
    gc.freeze()
    rec, pool, opened = cl.Recorder(), cl.JobPool(), cl.OpenStreams()
    submitted: list[str] = []
    samples: list[dict] = []
    prom: list = []
    lags: list[float] = []
    url, token = server.url, server.token
    spec = {**SPEC, "train": {**SPEC["train"], "epochs": args.epochs}}
    background = [
        asyncio.create_task(cl.keep_jobs(rec, url, token, pool, spec, args.live_jobs, submitted)),
        asyncio.create_task(sampler(server.pid, rec, pool, opened, samples, args.sample_seconds)),
        asyncio.create_task(cl.scrape(rec, url, server.metrics_token, prom, args.sample_seconds)),
        asyncio.create_task(loop_lag(lags)),
    ]
    n_ka = len(args.client_keepalive)
    users = [
        asyncio.create_task(
            cl.user(rec, url, token, pool, opened, args.poll_interval, i, args.client_keepalive[i % n_ka])
        )
        for i in range(args.clients)
    ]
    tasks = background + users
    try:
        # Return early only if a task dies: that is a bug of the bench, not a server failure.
        done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            t.result()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = rec.now()
    t0_wall = time.time() - elapsed
    await cl.cancel_live(rec, url, token, pool)
    jobs = await cl.final_states(url, token, submitted)
    return {
        "rec": rec,
        "seconds": elapsed,
        "samples": samples,
        "prom": prom,
        "lags": lags,
        "jobs": jobs,
        "gc_pauses": {
            "api": gc_pauses.summary(gc_pauses.read(server.gc_path), t0_wall),
            "generator": gc_pauses.summary(gen_pauses, t0_wall),
        },
    }


def _pauses(s: dict) -> str:
    return f"{s['count']} ({s['full_collections']}) / {s['max_ms']:.0f} / {s['total_ms']:.0f}"


def summarise(args, res: dict, soak: bool, out: Path) -> int:
    rec, seconds, samples = res["rec"], res["seconds"], res["samples"]
    lat_table = report.latency_table(rec, seconds)
    five = sum(n for (_, s), n in rec.codes.items() if s >= 500)
    conn = sum(rec.errors.values())
    # "stuck stream ended" is the epilogue of a "stuck stream" already counted.
    done = ("ended on a final state", "stuck stream ended")
    problems = {k: v for k, v in rec.streams.items() if k not in done}
    states: dict[str, int] = {}
    for j in res["jobs"].values():
        states[j["state"]] = states.get(j["state"], 0) + 1
    failed = {
        i: (j.get("error") or {}).get("message") for i, j in res["jobs"].items() if j["state"] == "failed"
    }
    ev_rate = report.sse_rate(rec, 0, seconds)
    lags_ms = np.asarray(res["lags"]) * 1000
    verdict = report.soak_verdict(samples, 0.0) if soak else None
    prom = res["prom"]
    gcp = res["gc_pauses"]
    cpus = [x["cpu_percent"] for x in samples[1:]]  # the first sample has no previous one
    cpu_med, cpu_max = (report.pct(cpus, 50), max(cpus)) if cpus else (float("nan"), float("nan"))
    summary_rows = [
        ["database", args.db],
        ["users (each: 1 SSE stream + polls)", args.clients],
        ["poll interval (s, jittered 0.5-1.5x)", args.poll_interval],
        ["duration (s)", round(seconds, 1)],
        ["requests (all routes)", sum(rec.codes.values())],
        ["5xx", five],
        ["connection errors / timeouts", conn],
        [
            "connection errors per client group",
            "; ".join(
                f"{g}: {rec.errors_by_group.get(g, 0)} of {n} requests"
                for g, n in sorted(rec.requests_by_group.items())
                if g
            ),
        ],
        ["SSE events received / s (all users)", round(ev_rate, 1)],
        ["SSE streams ended on a final state", rec.streams.get("ended on a final state", 0)],
        ["SSE problems (gaps, early ends, stuck)", sum(problems.values())],
        [
            "SSE delivery lag of live metric records p50 / p95 / p99 / max (s)",
            " / ".join(f"{report.pct(rec.delivery_lag, q):.2f}" for q in (50, 95, 99, 100)),
        ],
        ["jobs submitted", len(res["jobs"])],
        ["job states at the end", ", ".join(f"{k}: {v}" for k, v in sorted(states.items()))],
        [
            "load generator event-loop lag p50 / p99 (ms)",
            f"{report.pct(lags_ms, 50):.1f} / {report.pct(lags_ms, 99):.1f}",
        ],
        ["API RSS first / last sample (MiB)", f"{samples[0]['rss_mib']:.1f} / {samples[-1]['rss_mib']:.1f}"],
        ["API CPU median / max of samples (% of one core)", f"{cpu_med:.0f} / {cpu_max:.0f}"],
        ["API GC pauses >= 5 ms: count (full) / longest / total ms", _pauses(gcp["api"])],
        ["load generator GC pauses >= 5 ms: count (full) / longest / total ms", _pauses(gcp["generator"])],
        ["API threads first / last", f"{samples[0]['threads']} / {samples[-1]['threads']}"],
        ["API fds first / last", f"{samples[0]['fds']} / {samples[-1]['fds']}"],
    ]
    if prom:
        summary_rows.append(["/metrics body first / last (bytes)", f"{prom[0][1]} / {prom[-1][1]}"])
    text = f"{markdown_table(['', 'value'], summary_rows)}\n\n{lat_table}\n"
    if verdict:
        v = verdict
        text += (
            "\n"
            + markdown_table(
                ["soak", "value"],
                [
                    ["samples (every s)", f"{v['samples']} ({args.sample_seconds})"],
                    ["warm-up excluded (s)", v["warmup_s"]],
                    ["RSS median, first window after warm-up (MiB)", v["rss_start_mib"]],
                    ["RSS median, last window (MiB)", v["rss_end_mib"]],
                    ["RSS min / max (MiB)", f"{v['rss_min_mib']:.1f} / {v['rss_max_mib']:.1f}"],
                    ["slope after warm-up, whole span (MiB/min)", v["slope_mib_per_min"]],
                    ["slope over the second half (MiB/min), judged", v["late_slope_mib_per_min"]],
                    ["limit (MiB/min)", v["threshold_mib_per_min"]],
                    ["verdict", ("ok" if v["ok"] else "GROWING") if v["judged"] else "too short to judge"],
                ],
            )
            + "\n"
        )
    m = machine()
    text = f"{conditions(m)}\n\n{text}"
    for title, lines in (
        ("connection errors", rec.error_samples),
        ("SSE problems", rec.stream_problems),
        ("failed jobs", [f"{k}: {v}" for k, v in failed.items()]),
    ):
        if lines:
            text += f"\n{title} (first {len(lines)}):\n" + "\n".join(f"- {x}" for x in lines) + "\n"
    (out / "table.md").write_text(text)
    save_json(
        out / "results.json",
        {
            "machine": m,
            "args": vars(args),
            "spec": SPEC,
            "seconds": seconds,
            "codes": [[r, s, n] for (r, s), n in sorted(rec.codes.items())],
            "errors": [[r, e, n] for (r, e), n in sorted(rec.errors.items())],
            "errors_by_group": dict(rec.errors_by_group),
            "requests_by_group": dict(rec.requests_by_group),
            "error_samples": rec.error_samples,
            "latency": report.latency_rows(rec, seconds),
            "latency_headers": report.LATENCY_HEADERS,
            "sse_events_per_s": ev_rate,
            "sse_delivery_lag_s": {q: report.pct(rec.delivery_lag, q) for q in (50, 95, 99, 100)},
            "streams": dict(rec.streams),
            "stream_problems": rec.stream_problems,
            "jobs": {k: {"state": v["state"], "error": v.get("error")} for k, v in res["jobs"].items()},
            "samples": samples,
            "prometheus_bytes": prom,
            "soak": verdict,
            "gc_pauses": gcp,
            "per_minute_p99_ms": {r: report.per_minute_p99(rec, r, seconds) for r in rec.lats},
        },
    )
    report.plot(rec, samples, 0.0, verdict, seconds, out / ("soak.png" if soak else "load.png"))
    print(text)
    print(f"wrote {out}/table.md, results.json, {'soak' if soak else 'load'}.png")
    reasons = []
    if five:
        reasons.append(f"{five} responses were 5xx")
    if conn:
        reasons.append(f"{conn} requests got no response (connection error or timeout)")
    if problems:
        reasons.append(f"SSE problems: {problems}")
    if failed:
        reasons.append(f"{len(failed)} jobs failed")
    if verdict and not verdict["ok"]:
        reasons.append(
            f"RSS grows {verdict['late_slope_mib_per_min']:.2f} MiB/min over the soak's second half "
            f"(limit {verdict['threshold_mib_per_min']})"
        )
    for r in reasons:
        print(f"FAIL: {r}", file=sys.stderr)
    return 1 if reasons else 0


def keep_log(src: Path, dst: Path) -> None:
    """The server's log without the access lines of 2xx answers (100,000s of them in a soak):
    warnings, tracebacks and every non-2xx answer, each with its time."""
    with open(src, errors="replace") as f, open(dst, "w") as out:
        for line in f:
            if '" 20' in line and "HTTP/1.1" in line and "INFO:" in line:
                continue
            out.write(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200, help="Simulated dashboard users.")
    ap.add_argument("--seconds", type=float, default=120, help="Length of the load (without --soak-minutes).")
    ap.add_argument(
        "--soak-minutes", type=float, help="Soak: keep the load this long and judge the RSS trend."
    )
    ap.add_argument("--poll-interval", type=float, default=1.0, help="Seconds between a user's polls.")
    ap.add_argument("--live-jobs", type=int, default=3, help="Jobs kept queued or training.")
    ap.add_argument("--epochs", type=int, default=SPEC["train"]["epochs"], help="Epochs per job.")
    ap.add_argument("--sample-seconds", type=float, default=5.0, help="RSS and /metrics sampling period.")
    ap.add_argument(
        "--client-keepalive",
        type=float,
        nargs="+",
        default=[5.0],
        help="Seconds a user's client keeps an idle connection (httpx default 5); several values are "
        "dealt round-robin to the users, to compare them side by side.",
    )
    ap.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite", help="The API's database.")
    args = ap.parse_args()
    soak = args.soak_minutes is not None
    seconds = 60 * args.soak_minutes if soak else args.seconds
    out = results_dir(("load_soak" if soak else "load") + ("_postgres" if args.db == "postgres" else ""))
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="slimtrain-load-") as tmp, contextlib.ExitStack() as stack:
        database_url = None
        if args.db == "postgres":
            from tests.plugins.postgres import start_postgres

            pg = start_postgres()
            stack.callback(pg.stop)
            database_url = pg.new_database()
        with serve(Path(tmp), token, database_url=database_url) as server:
            print(
                f"API {server.url} (pid {server.pid}), {args.clients} users for {seconds:.0f} s", flush=True
            )
            res = asyncio.run(drive(server, args, seconds))
        with contextlib.suppress(OSError):  # the server's log, for a failure's post-mortem
            keep_log(server.log_path, out / "server.log")
    return summarise(args, res, soak, out)


if __name__ == "__main__":
    sys.exit(main())
