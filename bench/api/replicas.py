"""Load at one and two API processes (issue 17.5; not part of the test suite):
`python -m bench.api.replicas [--dbs postgres,sqlite] [--seconds 10] [--rounds 3] [--baseline REV]`.

Two API processes (uvicorn, one worker each, `SLIMTRAIN_RUN_SCHEDULER=false`: request handling
only, as in bench/api/run.py) on one database and one artifact folder, as replicas behind a load
balancer run. 2 x `--generators` load generators (bench/api/loadgen.py, closed loop, one process
and `--connections` connections each) run at once:
- "1 process": all send to process A (B stays up, idle);
- "2 processes": half send to A, half to B (what a round-robin balancer does).
One generator is one Python process: where cores are many, `--generators 2` or more keeps the
generators from being what limits the two processes.
Same generators, same connections, same route in both: only the number of processes serving
them differs. Each round measures both variants, in an order that alternates between rounds.
Routes: GET /v1/jobs/{id} (the route the issue's target names) and GET /healthz (the anchor).

Figures per database, route and variant: total req/s (all generators' requests over the wall
time), p50 and p99, and the API's CPU per request (psutil, user + system, all serving API
processes together; PostgreSQL's own CPU is not in it). Throughput at 2 over 1 is the issue's
figure (target >= 1.8x); it needs a free core per API process besides the generators', so the
table states the cores the run had.
"CPU per request at 2 over 1" is what the second process costs per request (the database and
whatever else they share); 2 / that ratio is the throughput two processes give where each has
its own core: an estimate from CPU time, not a measured throughput, and named so.
With `--baseline REV`, that git revision's API (`git archive`) is measured too, on databases of
its own, its processes up beside this tree's, every round measuring both codes.
Every API process runs on uvicorn's uvloop + httptools, as `slimtrain serve` does (api/cli.py);
`--stacks uvloop-httptools,asyncio-h11` also measures this tree on uvicorn's pure-Python stack
(`--loop asyncio --http h11`), what `serve` ran before, side by side in the same way.

Writes bench/results/api_replicas/{results.json,table.md,replicas.png}."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from api.client import Client
from bench.api.run import SPEC, TOKEN, checkout, cpu_seconds, merge, start_api
from bench.common import conditions, machine, markdown_table, results_dir, save_json

VARIANTS = ("1 process", "2 processes")
ROUTES = ("get_job", "healthz")
# uvicorn's event loop and HTTP implementation, by --stacks name; the first is `slimtrain serve`'s
STACKS = {
    "uvloop-httptools": ("--loop", "uvloop", "--http", "httptools"),
    "asyncio-h11": ("--loop", "asyncio", "--http", "h11"),
}
THIS = "this tree"


@dataclass(frozen=True)
class Setup:
    """One API under test: its source tree (None: this one) and uvicorn's stack."""

    code: Path | None
    stack: str


def generate(targets: list[str], path: str, seconds: float, connections: int, servers: list[int]) -> dict:
    """One generator per entry of `targets` (a server URL each), all at once; the requests, wall
    time, latencies and the CPU the `servers` (pids) spent meanwhile."""
    cmd = [sys.executable, "-m", "bench.api.loadgen"]
    opts = [path, "--token", TOKEN, "--seconds", str(seconds), "--connections", str(connections)]
    cpu0 = sum(cpu_seconds(pid) for pid in servers)
    procs = [subprocess.Popen([*cmd, url, *opts], stdout=subprocess.PIPE, text=True) for url in targets]
    outs = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"load generator exited {p.returncode}")
        outs.append(json.loads(out))
    cpu = sum(cpu_seconds(pid) for pid in servers) - cpu0
    requests = sum(o["requests"] for o in outs)
    wall = max(o["wall_s"] for o in outs)  # the generators run side by side
    return {  # the fields of bench.api.run.load's result, which merge reads
        "requests": requests,
        "errors": sum(o["errors"] for o in outs),
        "wall_s": wall,
        "req_per_s": requests / wall,
        "server_cpu_s": cpu,
        "latencies_ms": [x * 1000 for o in outs for x in o["latencies_s"]],
        "connections": connections * len(targets),
    }


def summarize(runs: list[dict]) -> dict:
    """bench.api.run's merge of rounds, without the latencies (results.json keeps figures only)."""
    return {k: v for k, v in merge(runs).items() if k != "latencies_ms"}


def bench_db(work: Path, db_urls: dict[str, str | None], setups: dict[str, Setup], a) -> dict:
    """{setup label: {route: {variant: figures}}} on one kind of database; each setup its own
    database (`db_urls`, by label; None: SQLite in its data folder), every setup's processes
    up for the whole measurement, each round measuring every setup and variant."""
    servers: dict[str, list] = {}
    try:
        plans, paths = {}, {}
        for label, setup in setups.items():
            data = work / label.replace(" ", "-")
            data.mkdir()
            extra = {"SLIMTRAIN_RUN_SCHEDULER": "false"}
            if db_urls[label]:
                extra["SLIMTRAIN_DATABASE_URL"] = db_urls[label]
            # one after the other: the first migrates the database
            args = STACKS[setup.stack]
            servers[label] = [start_api(data, extra, uvicorn_args=args, code=setup.code) for _ in range(2)]
            (pa, url_a), (pb, url_b) = servers[label]
            job = Client(url_a, TOKEN).submit(SPEC)["id"]
            paths[label] = {"get_job": f"/v1/jobs/{job}", "healthz": "/healthz"}
            plans[label] = {
                "1 process": ([url_a, url_a] * a.generators, [pa.pid]),
                "2 processes": ([url_a, url_b] * a.generators, [pa.pid, pb.pid]),
            }
            generate([url_a, url_b], paths[label]["get_job"], 2, a.connections, [pa.pid, pb.pid])  # warm-up
        runs = {label: {r: {v: [] for v in VARIANTS} for r in ROUTES} for label in setups}
        cases = [(label, v) for label in setups for v in VARIANTS]
        for i in range(a.rounds):
            for route in ROUTES:
                for label, variant in cases if i % 2 == 0 else reversed(cases):
                    targets, pids = plans[label][variant]
                    got = generate(targets, paths[label][route], a.seconds, a.connections, pids)
                    runs[label][route][variant].append(got)
        return {
            label: {route: {v: summarize(rs) for v, rs in by.items()} for route, by in routes.items()}
            for label, routes in runs.items()
        }
    finally:
        for pair in servers.values():
            for proc, _ in pair:
                proc.terminate()
                proc.wait(30)


def ratios(by_variant: dict) -> dict:
    one, two = by_variant["1 process"], by_variant["2 processes"]
    cpu = two["server_cpu_ms_per_request"] / one["server_cpu_ms_per_request"]
    return {
        "throughput_2_over_1": two["req_per_s"] / one["req_per_s"],
        "cpu_per_request_2_over_1": cpu,
        "cpu_bound_estimate_2_over_1": 2 / cpu,
    }


def rows(results: dict) -> list[list]:
    out = []
    for db, routes in results.items():
        for route, by in routes.items():
            r = ratios(by)
            for v in VARIANTS:
                f = by[v]
                out.append(
                    [
                        db,
                        route,
                        v,
                        f["requests"],
                        f["errors"],
                        round(f["req_per_s"]),
                        " / ".join(str(round(x)) for x in f["req_per_s_rounds"]),
                        round(f["req_per_s"] / routes["healthz"][v]["req_per_s"], 3),
                        round(f["server_cpu_ms_per_request"], 3),
                        round(f["p50_ms"], 2),
                        round(f["p99_ms"], 2),
                        f"{r['throughput_2_over_1']:.2f}x" if v == VARIANTS[1] else "",
                        f"{r['cpu_per_request_2_over_1']:.2f}x" if v == VARIANTS[1] else "",
                        f"{r['cpu_bound_estimate_2_over_1']:.2f}x" if v == VARIANTS[1] else "",
                    ]
                )
    return out


def plot(results: dict, path: Path, cores: int, generators: int) -> None:
    """One panel per route; per setup (database, code) the two variants side by side, the
    measured ratio and the CPU-bound estimate above them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(results)
    fig, axes = plt.subplots(1, len(ROUTES), figsize=(6 * len(ROUTES), 5), layout="constrained")
    width = 0.38
    for ax, route in zip(axes, ROUTES, strict=True):
        for j, v in enumerate(VARIANTS):
            xs = [i + (j - 0.5) * width for i in range(len(setups))]
            bars = ax.bar(xs, [results[s][route][v]["req_per_s"] for s in setups], width, label=v)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        top = max(results[s][route][v]["req_per_s"] for s in setups for v in VARIANTS)
        for i, s in enumerate(setups):
            r = ratios(results[s][route])
            ax.text(
                i,
                top * 1.07,
                f"{r['throughput_2_over_1']:.2f}x\n(est. {r['cpu_bound_estimate_2_over_1']:.2f}x)",
                ha="center",
                fontsize=7,
            )
        ax.set_ylim(0, top * 1.4)
        ax.set_xticks(range(len(setups)), [s.replace(", ", "\n") for s in setups], fontsize=7)
        ax.set_title(f"{route}: req/s, 2 processes / 1 measured (CPU-bound estimate)", fontsize=9)
        ax.set_ylabel("req/s (all generators)")
        ax.legend(fontsize=7, loc="upper center", ncols=2)
    fig.suptitle(f"API at 1 and 2 processes, {cores} cores, {generators} load generators", fontsize=10)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dbs", default="postgres,sqlite", help="Comma-separated: postgres, sqlite.")
    ap.add_argument("--seconds", type=float, default=10, help="Per route, variant and round.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=8, help="Per load generator.")
    ap.add_argument("--generators", type=int, default=1, help="Load generators per API process.")
    ap.add_argument("--baseline", help="A git revision whose API is measured too, side by side.")
    ap.add_argument(
        "--stacks",
        default="uvloop-httptools",
        help=f"Comma-separated uvicorn stacks to run this tree on: {', '.join(STACKS)}; the first is "
        "the baseline's.",
    )
    ap.add_argument("--plot-only", action="store_true", help="Redraw the plot from results.json.")
    a = ap.parse_args()
    if a.plot_only:
        out = results_dir("api_replicas")
        saved = json.loads((out / "results.json").read_text())
        # runs before --generators had two
        generators = saved["settings"].get("generators", 2)
        plot(saved["results"], out / "replicas.png", saved["cores"], generators)
        return
    dbs = [d.strip() for d in a.dbs.split(",") if d.strip()]
    if a.generators < 1:
        ap.error(f"--generators: {a.generators}; allowed: 1 or more")
    if unknown := set(dbs) - {"postgres", "sqlite"}:
        ap.error(f"--dbs: unknown {sorted(unknown)}; allowed: postgres, sqlite")
    stacks = [x.strip() for x in a.stacks.split(",") if x.strip()]
    unknown = set(stacks) - set(STACKS)
    if unknown or not stacks:
        ap.error(f"--stacks: {sorted(unknown) if stacks else 'none'}; allowed: {', '.join(STACKS)}")
    out = results_dir("api_replicas")
    setups: dict[str, Setup] = {}
    results: dict[str, dict] = {}
    pg = None
    with tempfile.TemporaryDirectory(prefix="slimtrain-replicas-") as tmp:
        base_commit = None
        if a.baseline:
            tree, base_commit = checkout(a.baseline, Path(tmp) / "baseline-code")
            setups[f"baseline {base_commit[:10]}"] = Setup(tree, stacks[0])
        setups[THIS] = Setup(None, stacks[0])
        for stack in stacks[1:]:
            setups[f"this tree on {stack}"] = Setup(None, stack)
        try:
            for db in dbs:
                urls: dict[str, str | None] = dict.fromkeys(setups)
                if db == "postgres":
                    from tests.plugins.postgres import start_postgres

                    pg = pg or start_postgres()
                    urls = {label: pg.new_database() for label in setups}
                work = Path(tmp) / db
                work.mkdir()
                by_setup = bench_db(work, urls, setups, a)
                for label, routes in by_setup.items():
                    results[db if label == THIS else f"{db}, {label}"] = routes
        finally:
            if pg is not None:
                pg.stop()
    m = machine()
    cores = len(os.sched_getaffinity(0))
    headers = [
        "database",
        "route",
        "API processes",
        "requests",
        "errors",
        "req/s",
        "req/s by round",
        "req/s vs healthz",
        "server CPU ms / request",
        "p50 ms",
        "p99 ms",
        "req/s 2 / 1",
        "CPU per request 2 / 1",
        "CPU-bound estimate 2 / 1",
    ]
    text = (
        f"{conditions(m)}\n{cores} cores for 2 API processes and {2 * a.generators} load generators; "
        f"{a.seconds:g} s per route, variant and round, {a.rounds} rounds, "
        f"{a.connections} connections per generator; baseline: {base_commit or '(none)'}; "
        f"uvicorn stacks: {', '.join(stacks)} (the first is the baseline's).\n\n"
        f"{markdown_table(headers, rows(results))}\n"
    )
    for label in setups:
        if label == THIS:
            continue
        text += (
            f"\nThis tree ({stacks[0]}) against {label} ({setups[label].stack}), same run:\n"
            + "\n".join(
                f"- {db}, {route}, {v}: {t['req_per_s'] / b['req_per_s']:.2f}x the req/s, API CPU "
                f"{b['server_cpu_ms_per_request']:.3f} -> {t['server_cpu_ms_per_request']:.3f} ms/request, "
                f"p99 {b['p99_ms']:.1f} -> {t['p99_ms']:.1f} ms"
                for db in dbs
                for route in ROUTES
                for v in VARIANTS
                for b, t in [(results[f"{db}, {label}"][route][v], results[db][route][v])]
            )
            + "\n"
        )
    (out / "table.md").write_text(text)
    save_json(
        out / "results.json",
        {
            "machine": m,
            "cores": cores,
            "settings": {
                "seconds": a.seconds,
                "rounds": a.rounds,
                "connections_per_generator": a.connections,
                "generators": 2 * a.generators,
                "baseline": a.baseline,
                "baseline_commit": base_commit,
                "stacks": {label: setup.stack for label, setup in setups.items()},
            },
            "results": results,
            "ratios": {db: {r: ratios(by) for r, by in routes.items()} for db, routes in results.items()},
        },
    )
    plot(results, out / "replicas.png", cores, 2 * a.generators)
    print(text)


if __name__ == "__main__":
    main()
