"""API benchmark (not part of the test suite): `python -m bench.api.run`.

1. GET /v1/jobs/{id}, GET /v1/jobs (a page of 50 jobs) and POST /v1/jobs against one uvicorn
   worker (SQLite, background loops off so only request handling is measured), driven by
   bench/api/loadgen.py in its own process; GET /healthz as the machine's hello-world anchor.
   With BENCH_BASELINE=REV (a git revision), the same routes are measured on that revision's
   code too, side by side in one run: both servers up at once, each route measured in
   BENCH_ROUNDS rounds that alternate which code goes first, so a load that drifts during the
   run weighs on both alike. Ratios (route / healthz) are taken within one code's figures.
   Besides req/s and latencies, the server process's CPU per request (psutil, user + system):
   on a shared machine other load takes cores away from the server, which moves req/s and
   latency a lot and the CPU a request costs little, so "CPU-bound req/s vs healthz" (healthz's
   CPU per request / the route's) is the steadier figure of what a route costs.
2. Submit -> first metric on `slimtrain serve`'s embedded Ray: small digits jobs (2 DDP
   workers), timed from the POST to the job's `running` event, its first metric record, and its
   first training loss, as seen over the SSE stream.
   BENCH_JOBS=0 skips this part (bench/api/first_metric.py measures it in detail).
Writes bench/results/api/{results.json,table.md,latency.png}."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from api.client import Client
from bench.common import ROOT, conditions, machine, markdown_table, results_dir, save_json
from tests.plugins.server import wait_ready
from tests.raycluster import free_port

TOKEN = "bench-token-0123456789abcdef"
SPEC = {
    "name": "bench",
    "model": {"name": "mlp"},
    "data": {"name": "digits"},
    "train": {"epochs": 3},
    "parallel": {"workers": 2},
}


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def start_api(
    data: Path,
    extra: dict[str, str],
    serve: bool = False,
    uvicorn_args: tuple[str, ...] = (),
    code: Path | None = None,
) -> tuple[subprocess.Popen, str]:
    """`code`: run the server from that source tree (a baseline revision) instead of this one."""
    port = free_port()
    env = {
        **os.environ,
        "SLIMTRAIN_DATA_DIR": str(data),
        "SLIMTRAIN_API_TOKENS": f"{TOKEN}:bench",
        "SLIMTRAIN_PORT": str(port),
        **extra,
    }
    if code is not None:
        env["PYTHONPATH"] = str(code)
    if serve:
        cmd = [sys.executable, "-m", "api.cli", "serve"]
    else:
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--port", str(port)]
        cmd += ["--workers", "1", "--log-level", "warning", "--no-access-log", *uvicorn_args]
    with open(data / "server.log", "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=code)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, 120, proc)
    return proc, url


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the server process and its children so far."""
    proc = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [proc, *proc.children(recursive=True)])


def load(
    url: str,
    path: str,
    seconds: float,
    connections: int,
    method="GET",
    body: Path | None = None,
    server_pid: int | None = None,
) -> dict:
    """`server_pid`: also the server's CPU per request, which the machine's other load moves far
    less than req/s (a busy machine takes cores away, not CPU cycles from each request)."""
    cmd = [sys.executable, "-m", "bench.api.loadgen", url, path, "--token", TOKEN, "--method", method]
    cmd += ["--seconds", str(seconds), "--connections", str(connections)]
    if body:
        cmd += ["--body", str(body)]
    cpu0 = cpu_seconds(server_pid) if server_pid else None
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    cpu = cpu_seconds(server_pid) - cpu0 if server_pid else None
    lat = r["latencies_s"]
    return {
        "server_cpu_s": cpu,
        "requests": r["requests"],
        "errors": r["errors"],
        "wall_s": r["wall_s"],
        "req_per_s": r["requests"] / r["wall_s"],
        "p50_ms": percentile(lat, 0.50) * 1000,
        "p90_ms": percentile(lat, 0.90) * 1000,
        "p99_ms": percentile(lat, 0.99) * 1000,
        "latencies_ms": [x * 1000 for x in lat],
        "connections": connections,
    }


PAGE_JOBS = 50  # the list route reads a full default page
ROUTES = ("healthz", "get_job", "list_jobs", "post_job")


def checkout(rev: str, dest: Path) -> tuple[Path, str]:
    """The tree of git revision `rev` in `dest` (git archive: no worktree bookkeeping left
    behind); returns it and the full commit id."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    where = subprocess.run(
        [sys.executable, "-c", "import api.app; print(api.app.__file__)"],
        cwd=dest,
        env={**os.environ, "PYTHONPATH": str(dest)},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not where.startswith(str(dest)):  # the baseline must really run its own code
        raise RuntimeError(f"baseline imports api from {where}, not from {dest}")
    return dest, commit


def merge(runs: list[dict]) -> dict:
    """Rounds of one route on one code, as one measurement."""
    lat = [x for r in runs for x in r["latencies_ms"]]
    wall = sum(r["wall_s"] for r in runs)
    n = len(lat)
    return {
        "requests": n,
        "server_cpu_ms_per_request": 1000 * sum(r["server_cpu_s"] for r in runs) / n,
        "errors": sum(r["errors"] for r in runs),
        "req_per_s": n / wall,
        "req_per_s_rounds": [r["req_per_s"] for r in runs],
        "p50_ms": percentile(lat, 0.50),
        "p90_ms": percentile(lat, 0.90),
        "p99_ms": percentile(lat, 0.99),
        "latencies_ms": lat,
        "connections": runs[0]["connections"],
    }


def bench_requests(work: Path, seconds: float, codes: dict[str, Path | None], rounds: int) -> dict:
    """{code label: {route: figures}}, every code's server up for the whole measurement."""
    servers, paths = {}, {}
    body = work / "spec.json"
    body.write_text(json.dumps(SPEC))
    try:
        for label, code in codes.items():
            (work / f"requests-{label}").mkdir()
            proc, url = start_api(work / f"requests-{label}", {"SLIMTRAIN_RUN_SCHEDULER": "false"}, code=code)
            servers[label] = (proc, url)
            c = Client(url, TOKEN)
            ids = [c.submit({**SPEC, "name": f"bench-{i}"})["id"] for i in range(PAGE_JOBS)]
            paths[label] = {
                "healthz": ("/healthz", 16, "GET"),
                "get_job": (f"/v1/jobs/{ids[0]}", 16, "GET"),
                "list_jobs": (f"/v1/jobs?limit={PAGE_JOBS}", 16, "GET"),
                "post_job": ("/v1/jobs", 4, "POST"),
            }
            load(url, paths[label]["get_job"][0], 2, 16)  # warm-up
        runs: dict[str, dict[str, list]] = {label: {} for label in codes}
        # Rounds outermost: each round measures every route on every code within a minute or
        # two, so a load that changes during the run lands on all of them alike.
        for r in range(rounds):
            for route in ROUTES:
                order = list(codes) if r % 2 == 0 else list(reversed(codes))
                for label in order:
                    path, conns, method = paths[label][route]
                    proc, url = servers[label]
                    res = load(
                        url, path, seconds, conns, method, body if method == "POST" else None, proc.pid
                    )
                    runs[label].setdefault(route, []).append(res)
        return {label: {route: merge(rs) for route, rs in by.items()} for label, by in runs.items()}
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)


def bench_first_metric(work: Path, jobs: int) -> list[dict]:
    extra = {"SLIMTRAIN_RAY_DASHBOARD_PORT": str(free_port()), "SLIMTRAIN_SCHEDULER_INTERVAL_S": "1.0"}
    proc, url = start_api(work / "serve", extra, serve=True)
    out = []
    try:
        c = Client(url, TOKEN)
        for i in range(jobs):
            t0 = time.perf_counter()
            job = c.submit({**SPEC, "name": f"bench-{i}"})
            row = {"job": job["id"]}
            for ev in c.events(job["id"]):
                t = time.perf_counter() - t0
                if ev.type == "state" and ev.data["state"] == "running":
                    row.setdefault("running_s", t)
                elif ev.type == "metric":
                    row.setdefault("first_metric_s", t)
                    if ev.data.get("kind") == "train":
                        row.setdefault("first_loss_s", t)
            row["total_s"] = time.perf_counter() - t0
            row["state"] = c.job(job["id"])["state"]
            out.append(row)
    finally:
        proc.terminate()
        proc.wait(60)
    return out


def plot(req: dict, path: Path) -> None:
    """Latency CDFs: one colour per route, one line style per code (this tree solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = ["--", "-"] if len(req) == 2 else ["-"]  # a baseline dashed, this tree solid
    colours = dict(zip(ROUTES, ["tab:grey", "tab:blue", "tab:green", "tab:orange"], strict=True))
    for (label, routes), ls in zip(req.items(), styles, strict=False):
        for name, r in routes.items():
            xs = sorted(r["latencies_ms"])
            ax.plot(
                xs,
                [i / len(xs) for i in range(len(xs))],
                ls=ls,
                color=colours[name],
                label=f"{label}: {name} ({r['req_per_s']:.0f} req/s)",
            )
    ax.axvline(50, color="black", ls="-.", lw=1, label="p99 target 50 ms")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("slimtrain API, one uvicorn worker, loopback, 16 connections (POST: 4)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def request_rows(req: dict) -> list[list]:
    rows = []
    for label, routes in req.items():
        base = routes["healthz"]["req_per_s"]
        for name in ROUTES:
            r = routes[name]
            rows.append(
                [
                    name,
                    label,
                    r["connections"],
                    r["requests"],
                    r["errors"],
                    round(r["req_per_s"]),
                    " / ".join(str(round(x)) for x in r["req_per_s_rounds"]),
                    round(r["req_per_s"] / base, 3),
                    r["server_cpu_ms_per_request"],
                    round(routes["healthz"]["server_cpu_ms_per_request"] / r["server_cpu_ms_per_request"], 3),
                    r["p50_ms"],
                    r["p90_ms"],
                    r["p99_ms"],
                ]
            )
    return rows


def main() -> None:
    seconds = float(os.environ.get("BENCH_SECONDS", "10"))
    jobs = int(os.environ.get("BENCH_JOBS", "3"))
    rounds = int(os.environ.get("BENCH_ROUNDS", "2"))
    baseline = os.environ.get("BENCH_BASELINE")
    out = results_dir("api")
    with tempfile.TemporaryDirectory(prefix="slimtrain-bench-") as tmp:
        work = Path(tmp)
        codes: dict[str, Path | None] = {}
        base_commit = None
        if baseline:
            tree, base_commit = checkout(baseline, work / "baseline-code")
            codes[f"baseline {base_commit[:10]}"] = tree
        codes["this tree"] = None
        req = bench_requests(work, seconds, codes, rounds)
        (work / "serve").mkdir()
        first = bench_first_metric(work, jobs) if jobs else []
    headers = [
        "route",
        "code",
        "connections",
        "requests",
        "errors",
        "req/s",
        "req/s by round",
        "req/s vs healthz",
        "server CPU ms / request",
        "CPU-bound req/s vs healthz",
        "p50 ms",
        "p90 ms",
        "p99 ms",
    ]
    table = markdown_table(headers, request_rows(req))
    if baseline:
        (b, bf), (t, tf) = list(req.items())
        speed = [
            f"{name}: {tf[name]['req_per_s'] / bf[name]['req_per_s']:.2f}x the req/s of {b}, server CPU "
            f"{bf[name]['server_cpu_ms_per_request']:.3f} -> {tf[name]['server_cpu_ms_per_request']:.3f} ms "
            f"per request, p50 {bf[name]['p50_ms']:.1f} -> {tf[name]['p50_ms']:.1f} ms, "
            f"p99 {bf[name]['p99_ms']:.1f} -> {tf[name]['p99_ms']:.1f} ms"
            for name in ROUTES
        ]
        table += "\n\nThis tree against the baseline, same run:\n" + "\n".join(f"- {x}" for x in speed)
    frows = [
        [
            r["job"],
            r.get("running_s"),
            r.get("first_metric_s"),
            r.get("first_loss_s"),
            r["total_s"],
            r["state"],
        ]
        for r in first
    ]
    ftable = (
        markdown_table(
            ["job", "to running (s)", "to first metric (s)", "to first loss (s)", "to end (s)", "state"],
            frows,
        )
        if first
        else "Submit -> first metric: not run here (BENCH_JOBS=0); see bench/results/api_first_metric."
    )
    m = machine()
    sizes = (
        f"BENCH_SECONDS={seconds:g} per route and round, BENCH_ROUNDS={rounds}, BENCH_JOBS={jobs}, "
        f"BENCH_BASELINE={baseline or '(none)'}"
        + (f" = {base_commit}" if base_commit else "")
        + f"; the list route reads a page of {PAGE_JOBS} jobs"
    )
    text = f"{conditions(m)}\n{sizes}.\n\n{table}\n\n{ftable}\n"
    (out / "table.md").write_text(text)
    save_json(
        out / "results.json",
        {
            "machine": m,
            "settings": {
                "seconds_per_route_and_round": seconds,
                "rounds": rounds,
                "jobs": jobs,
                "baseline": baseline,
                "baseline_commit": base_commit,
                "page_jobs": PAGE_JOBS,
            },
            "requests": {
                label: {
                    k: {kk: vv for kk, vv in v.items() if kk != "latencies_ms"} for k, v in routes.items()
                }
                for label, routes in req.items()
            },
            "first_metric": first,
        },
    )
    plot(req, out / "latency.png")
    print(text)


if __name__ == "__main__":
    main()
