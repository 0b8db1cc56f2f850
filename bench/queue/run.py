"""Cost of a deep queue while it waits (issue 17.3; not part of the test suite):
`python -m bench.queue.run`.

For each database (SQLite, and PostgreSQL on a throwaway server as tests/plugins/postgres.py
starts) and each depth (0, 1,000, 10,000 jobs queued behind one that holds the whole cluster),
an API process (bench/queue/serve.py: uvicorn, the real scheduler, reconciler and ingest loops,
a Ray stand-in of 2 CPUs) is started on a job store filled beforehand; once the scheduler has
given every queued job its reason, the bench measures the otherwise idle API's CPU over
`--idle-s` seconds (from /proc: user + system), then GET /v1/jobs/{id} of a queued job and
GET /v1/jobs?limit=50, `--gets` each, one at a time and interleaved with GET /healthz (p50, p99;
and GET job's p99 over healthz's, which the machine's drift between depths moves far less).
With `--baseline REV` the same is measured with the API of that git revision (extracted with
`git archive`), for comparison.
Targets: idle CPU and GET p99 at depth <= 1.2x of depth 0 (GET p99 judged by its ratio to
healthz's).
Writes bench/results/queue/{results.json,table.md,queue.png}."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import ROOT, conditions, machine, markdown_table, results_dir, save_json
from service.store.db import Database
from service.store.repo import NewJob, Store, add_job_rows
from tests.plugins.server import wait_ready
from tests.raycluster import free_port

TOKEN = "bench-token-0123456789abcdef"
TENANT = "bench"
SPEC = {"name": "q", "model": {"name": "mlp"}, "data": {"name": "digits"}, "parallel": {"workers": 2}}
TICKS = os.sysconf("SC_CLK_TCK")


def fill(url: str, depth: int) -> str:
    """The running job's successor and `depth` jobs behind it, in one transaction (what as many
    submissions leave). Returns the id of the last queued job."""
    db = Database(url)
    db.upgrade()
    store = Store(db)
    with store.db.write() as s:
        store._ensure_tenant(s, TENANT, 0.0)
        ids = [
            add_job_rows(s, NewJob(f"q-{i:06d}", TENANT, "q", SPEC, 0, 1), 1.7e9 + i).id
            for i in range(depth + 1)
        ]
    db.dispose()
    return ids[-1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def measure(code: Path, db_url: str, depth: int, args, work: Path) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(code),
        "SLIMTRAIN_DATA_DIR": str(work),
        "SLIMTRAIN_DATABASE_URL": db_url,
        "SLIMTRAIN_API_TOKENS": f"{TOKEN}:{TENANT}",
        "SLIMTRAIN_ARTIFACT_URI": str(work / "artifacts"),
    }
    # Filled by the code under test: its migrations make the schema (a baseline revision may
    # not know a newer one's).
    fill_py = f"from bench.queue.run import fill; print(fill({db_url!r}, {depth}))"
    last = subprocess.run(
        [sys.executable, "-c", fill_py], cwd=code, env=env, check=True, capture_output=True, text=True
    ).stdout.split()[-1]
    port = free_port()
    log = (work / "api.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.queue.serve", str(port)],
        cwd=code,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=120, proc=proc)
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        # Settled: the scheduler has admitted the first job and told the last one why it waits.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            job = client.get(f"/v1/jobs/{last}").json()
            if (
                (job["state"] != "queued")
                if depth == 0
                else (job.get("reason") or "").startswith("waiting behind")
            ):
                break
            time.sleep(0.5)
        time.sleep(args.settle_s)
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(args.idle_s)
        idle = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
        probe = "q-000001" if depth else last
        out = {"depth": depth, "idle_cpu": idle}
        # Interleaved with /healthz, which the queue cannot touch: each depth is measured at
        # another time, and on this machine a second's drift moved the p99 of 400 GETs 2-3x
        # (a first run of this bench), so the ratio to the same moments' healthz is the figure
        # that compares depths.
        routes = {"get_job": f"/v1/jobs/{probe}", "list_50": "/v1/jobs?limit=50", "healthz": "/healthz"}
        lat: dict[str, list[float]] = {name: [] for name in routes}
        for _ in range(args.gets):
            for name, path in routes.items():
                t = time.perf_counter()
                client.get(path).raise_for_status()
                lat[name].append((time.perf_counter() - t) * 1000)
        for name, xs in lat.items():
            out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = percentile(xs, 0.5), percentile(xs, 0.99)
        out["get_job_p99_vs_healthz"] = out["get_job_p99_ms"] / out["healthz_p99_ms"]
        client.close()
        return out
    except Exception:
        log.close()
        print((work / "api.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="0,1000,10000")
    p.add_argument("--dbs", default="sqlite,postgres")
    # 60 s: the idle API uses ~1.5 % of a core, which /proc counts in 10 ms ticks (90 in 60 s);
    # 20 s windows moved by more than the 20 % the target judges from run to run
    p.add_argument("--idle-s", type=float, default=60.0)
    p.add_argument("--settle-s", type=float, default=3.0)
    p.add_argument("--gets", type=int, default=400)
    p.add_argument("--baseline", default=None, help="also measure this git revision's API")
    args = p.parse_args(argv)
    out = results_dir("queue")
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        codes = [("this", ROOT)]
        if args.baseline:
            old = Path(tmp) / "baseline"
            old.mkdir()
            tar = subprocess.run(
                ["git", "archive", args.baseline], cwd=ROOT, check=True, capture_output=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=tar, check=True)
            # The same server script, importing that revision's API.
            shutil.copytree(ROOT / "bench" / "queue", old / "bench" / "queue", dirs_exist_ok=True)
            codes.append((f"baseline {args.baseline}", old))
        pg = None
        try:
            for db in args.dbs.split(","):
                if db == "postgres":
                    from tests.plugins.postgres import start_postgres

                    pg = pg or start_postgres()
                for label, code in codes:
                    base = None
                    for depth in map(int, args.depths.split(",")):
                        work = Path(tempfile.mkdtemp(dir=tmp))
                        url = f"sqlite:///{work / 'slimtrain.db'}" if db == "sqlite" else pg.new_database()
                        r = measure(code, url, depth, args, work) | {"db": db, "code": label}
                        base = base or r
                        for k in ("idle_cpu", "get_job_p99_ms", "get_job_p99_vs_healthz", "list_50_p99_ms"):
                            r[f"{k}_x"] = r[k] / base[k] if base[k] else float("nan")
                        results.append(r)
                        print(r, flush=True)
                        rows.append(
                            [
                                db,
                                label,
                                f"{depth:,}",
                                round(r["idle_cpu"] * 100, 2),
                                round(r["idle_cpu_x"], 2),
                                round(r["get_job_p50_ms"], 2),
                                round(r["get_job_p99_ms"], 2),
                                round(r["get_job_p99_ms_x"], 2),
                                round(r["healthz_p99_ms"], 2),
                                round(r["get_job_p99_vs_healthz"], 2),
                                round(r["get_job_p99_vs_healthz_x"], 2),
                                round(r["list_50_p99_ms"], 2),
                                round(r["list_50_p99_ms_x"], 2),
                            ]
                        )
        finally:
            if pg is not None:
                pg.stop()
    m = machine()
    save_json(out / "results.json", {"machine": m, "args": vars(args), "results": results})
    table = markdown_table(
        [
            "db",
            "API",
            "queued",
            "idle CPU % core",
            "x empty",
            "GET job p50 ms",
            "p99 ms",
            "x empty",
            "healthz p99 ms",
            "GET p99 / healthz p99",
            "x empty",
            "list 50 p99 ms",
            "x empty",
        ],
        rows,
    )
    (out / "table.md").write_text(f"{table}\n\n{conditions(m)}\n")
    plot(results, out / "queue.png")
    print(table)
    return 0


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    series: dict[tuple, list[dict]] = {}
    for r in results:
        series.setdefault((r["db"], r["code"]), []).append(r)
    for (db, code), rs in series.items():
        depths = [max(r["depth"], 1) for r in rs]
        axes[0].plot(depths, [r["idle_cpu"] * 100 for r in rs], marker="o", label=f"{db}, {code}")
        axes[1].plot(depths, [r["get_job_p99_ms"] for r in rs], marker="o", label=f"{db}, {code}")
        axes[2].plot(depths, [r["get_job_p99_vs_healthz"] for r in rs], marker="o", label=f"{db}, {code}")
    titles = ("idle API CPU, % of a core", "GET job p99, ms", "GET job p99 / healthz p99 (interleaved)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("jobs queued (0 plotted at 1)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
