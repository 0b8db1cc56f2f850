"""API benchmark (not part of the test suite): `python -m bench.api.run`.

1. GET /v1/jobs/{id} and POST /v1/jobs against one uvicorn worker (SQLite, background loops off
   so only request handling is measured), driven by bench/api/loadgen.py in its own process;
   GET /healthz as the machine's hello-world anchor.
2. Submit -> first metric on `slimtrain serve`'s embedded Ray: small digits jobs (2 DDP
   workers), timed from the POST to the job's `running` event, its first metric record, and its
   first training loss, as seen over the SSE stream.
Writes bench/out/api/{results.json,table.md,latency.png}."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from api.client import Client
from bench.common import conditions, machine, markdown_table, results_dir, save_json
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
    data: Path, extra: dict[str, str], serve: bool = False, uvicorn_args: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "SLIMTRAIN_DATA_DIR": str(data),
        "SLIMTRAIN_API_TOKENS": f"{TOKEN}:bench",
        "SLIMTRAIN_PORT": str(port),
        **extra,
    }
    if serve:
        cmd = [sys.executable, "-m", "api.cli", "serve"]
    else:
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--port", str(port)]
        cmd += ["--workers", "1", "--log-level", "warning", "--no-access-log", *uvicorn_args]
    with open(data / "server.log", "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, 120, proc)
    return proc, url


def load(
    url: str, path: str, seconds: float, connections: int, method="GET", body: Path | None = None
) -> dict:
    cmd = [sys.executable, "-m", "bench.api.loadgen", url, path, "--token", TOKEN, "--method", method]
    cmd += ["--seconds", str(seconds), "--connections", str(connections)]
    if body:
        cmd += ["--body", str(body)]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    lat = r["latencies_s"]
    return {
        "requests": r["requests"],
        "errors": r["errors"],
        "req_per_s": r["requests"] / r["wall_s"],
        "p50_ms": percentile(lat, 0.50) * 1000,
        "p90_ms": percentile(lat, 0.90) * 1000,
        "p99_ms": percentile(lat, 0.99) * 1000,
        "latencies_ms": [x * 1000 for x in lat],
        "connections": connections,
    }


def bench_requests(work: Path, seconds: float) -> dict:
    proc, url = start_api(work / "requests", {"SLIMTRAIN_RUN_SCHEDULER": "false"})
    try:
        c = Client(url, TOKEN)
        job_id = c.submit(SPEC)["id"]
        body = work / "spec.json"
        body.write_text(json.dumps(SPEC))
        load(url, f"/v1/jobs/{job_id}", 2, 16)  # warm-up
        return {
            "healthz": load(url, "/healthz", seconds, 16),
            "get_job": load(url, f"/v1/jobs/{job_id}", seconds, 16),
            "post_job": load(url, "/v1/jobs", seconds, 4, "POST", body),
        }
    finally:
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in req.items():
        xs = sorted(r["latencies_ms"])
        ax.plot(xs, [i / len(xs) for i in range(len(xs))], label=f"{name} ({r['req_per_s']:.0f} req/s)")
    ax.axvline(50, color="grey", ls="--", lw=1, label="p99 target 50 ms")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("slimtrain API, one uvicorn worker, loopback")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    seconds = float(os.environ.get("BENCH_SECONDS", "10"))
    jobs = int(os.environ.get("BENCH_JOBS", "3"))
    out = results_dir("api")
    with tempfile.TemporaryDirectory(prefix="slimtrain-bench-") as tmp:
        work = Path(tmp)
        (work / "requests").mkdir()
        (work / "serve").mkdir()
        req = bench_requests(work, seconds)
        first = bench_first_metric(work, jobs)
    rows = [
        [
            name,
            r["connections"],
            r["requests"],
            r["errors"],
            round(r["req_per_s"]),
            r["p50_ms"],
            r["p90_ms"],
            r["p99_ms"],
        ]
        for name, r in req.items()
    ]
    headers = ["route", "connections", "requests", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms"]
    table = markdown_table(headers, rows)
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
    ftable = markdown_table(
        ["job", "to running (s)", "to first metric (s)", "to first loss (s)", "to end (s)", "state"], frows
    )
    m = machine()
    sizes = f"BENCH_SECONDS={seconds:g} per route, BENCH_JOBS={jobs}"
    text = f"{conditions(m)}\n{sizes}.\n\n{table}\n\n{ftable}\n"
    (out / "table.md").write_text(text)
    save_json(
        out / "results.json",
        {
            "machine": m,
            "settings": {"seconds_per_route": seconds, "jobs": jobs},
            "requests": {k: {kk: vv for kk, vv in v.items() if kk != "latencies_ms"} for k, v in req.items()},
            "first_metric": first,
        },
    )
    plot(req, out / "latency.png")
    print(text)


if __name__ == "__main__":
    main()
