"""Submit -> first metric, broken down (not part of the test suite): `python -m bench.api.first_metric`.

Starts `slimtrain serve` on its embedded Ray head (2 CPUs), runs one warm-up job, then submits
`examples/digits-gmp90.yaml` RUNS times one after the other (default 5). Each run is followed
until its first training record is visible through `GET /v1/jobs/ID/metrics`, then cancelled
(what comes after the first metric is not measured here), and the cluster is left to settle.
Every milestone is a wall-clock time on this machine, in seconds from just before the POST:

  submit            the POST answered
  ray_running       Ray reports the Ray job RUNNING (polled every 0.1 s: runtime env set up,
                    the job's supervisor actor up)
  driver_process    the driver process was created (its pid from Ray's job details, its start
                    time from /proc, to 10 ms; before 2026-12-02 22:55 UTC psutil's, up to 1 s early)
  driver_record     the driver's first record (`starting` phase, when the driver writes one)
  driver_connected  `preparing` phase: the driver's imports done and Ray joined
  data_loaded       `waiting_for_workers` phase: data loaded, model built, plan checked
  workers_up        rank 0's `start` event: the Ray Train worker group up, model built there
  first_step        rank 0's first `train` record
  relayed           the driver wrote the part holding that record (the part's mtime)
  ingested          the API stored it (its event's `created_at` in the job database)
  visible           this client saw it in `GET /v1/jobs/ID/metrics` (polled every 0.1 s)
  first_record      the first record of any kind seen there (a phase record, when the driver
                    writes one as it starts)
  first_metric      the first metric seen there: a `train` or `eval` record (the driver's step-0
                    evaluation, workers.initial_eval, when it scores one); `first_metric_kind`
                    says which

Beside each run, after it ends, a fresh process times `import ray.train.torch` (and another
`import torch`): the machine's price of one fresh torch process at that moment.

Variants (before/after a change, or another Ray setting) run one after the other:
  python -m bench.api.first_metric --label before --code /tmp/slimtrain-base   # another tree
  python -m bench.api.first_metric --label after
  python -m bench.api.first_metric --combine before after   # table.md, results.json, png
`--code DIR` runs the server (and so the drivers and workers) from that source tree;
`--env K=V` adds a variable to the server's environment (Ray's head inherits it). Each variant
is written to bench/out/api_first_metric/LABEL.json; --combine writes
bench/results/api_first_metric/ (or BENCH_OUT/api_first_metric)."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from api.client import Client
from bench.common import ROOT, conditions, machine, markdown_table, out_dir, results_dir, save_json
from tests.plugins.server import wait_ready
from tests.raycluster import free_port

TOKEN = "bench-token-0123456789abcdef"
SPEC = ROOT / "examples" / "digits-gmp90.yaml"
MILESTONES = [
    "submit",
    "ray_running",
    "driver_process",
    "driver_record",
    "driver_connected",
    "data_loaded",
    "workers_up",
    "first_step",
    "relayed",
    "ingested",
    "visible",
]
PHASES = {"starting": "driver_record", "preparing": "driver_connected", "waiting_for_workers": "data_loaded"}
TERMINAL = {"succeeded", "failed", "cancelled"}
RAY_DONE = {"STOPPED", "SUCCEEDED", "FAILED"}


def start_serve(data: Path, code: Path, extra: dict[str, str]) -> tuple[subprocess.Popen, str, str]:
    port, ray_port = free_port(), free_port()
    env = {
        **os.environ,
        "SLIMTRAIN_DATA_DIR": str(data),
        "SLIMTRAIN_API_TOKENS": f"{TOKEN}:bench",
        "SLIMTRAIN_PORT": str(port),
        "SLIMTRAIN_RAY_DASHBOARD_PORT": str(ray_port),
        "SLIMTRAIN_DRIVER_PYTHON": sys.executable,
        "PYTHONPATH": str(code),
        **extra,
    }
    log = open(data / "server.log", "ab")  # noqa: SIM115 - open as long as the server runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve"], cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, 180, proc)
    return proc, url, f"http://127.0.0.1:{ray_port}"


def ray_client(address: str):
    from service.ray_jobs import RayJobs
    from workers.ray_runtime import require_token_auth

    require_token_auth()  # the SDK sends the head's token (~/.ray/auth_token) only in token mode
    return RayJobs(address)


def ray_details(ray, sid: str) -> dict | None:
    r = ray._request("GET", f"/api/jobs/{sid}")
    return r.json() if r.status_code == 200 else None


def import_seconds(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(r.stdout.strip().splitlines()[-1])


def idle_workers(server_pid: int) -> dict:
    """The server's Ray head's idle worker processes now (a warm pool takes an actor without a
    process start), and their mean resident MiB (one that preloaded torch is several times the
    size)."""
    import psutil

    rss = []
    for p in psutil.Process(server_pid).children(recursive=True):
        try:
            cmd = p.cmdline()
            if cmd and cmd[0].startswith("ray::IDLE"):
                rss.append(p.memory_info().rss / 2**20)
        except psutil.Error:
            continue
    return {"idle_workers": len(rss), "idle_worker_mib": round(sum(rss) / len(rss), 1) if rss else None}


def follow(c: Client, ray, spec: dict, name: str, timeout: float = 300.0) -> dict:
    """Submit one job and follow it to its first visible train record; cancel it; return times."""
    t0 = time.time()
    job = c.submit({**spec, "name": name})
    jid = job["id"]
    at: dict[str, float] = {"submit": time.time() - t0}
    records: dict[int, dict] = {}
    seen_at: dict[int, float] = {}
    cursor = None
    pid = None
    while time.time() - t0 < timeout:
        now = time.time() - t0
        if "driver_process" not in at or "ray_running" not in at:
            d = ray_details(ray, jid)
            if d:
                if d.get("status") in ("RUNNING", *RAY_DONE):
                    at.setdefault("ray_running", now)
                pid = pid or (d.get("driver_info") or {}).get("pid")
                if pid and "driver_process" not in at:
                    at["driver_process"] = process_started_at(int(pid)) - t0
        params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        page = c._request("GET", f"/v1/jobs/{jid}/metrics", params=params).json()
        for item in page["items"]:
            records[item["seq"]] = item["data"]
            seen_at[item["seq"]] = time.time() - t0
            cursor = str(item["seq"])
        if any(r.get("kind") == "train" for r in records.values()):
            break
        if c.job(jid)["state"] in TERMINAL:
            break
        time.sleep(0.1)
    c.cancel(jid) if c.job(jid)["state"] not in TERMINAL else None
    deadline = time.time() + 120
    while time.time() < deadline:
        d = ray_details(ray, jid)
        if c.job(jid)["state"] in TERMINAL and (d is None or d.get("status") in RAY_DONE):
            break
        time.sleep(0.5)
    return {"job": jid, "t0": t0, "at": at, "records": records, "seen_at": seen_at}


def breakdown(run: dict, data: Path) -> dict:
    """Milestones (s from the POST) of a followed run, from its records, parts and events."""
    t0, at, records = run["t0"], dict(run["at"]), run["records"]
    for seq in sorted(records):
        r = records[seq]
        if r.get("kind") == "phase" and r.get("phase") in PHASES:
            at.setdefault(PHASES[r["phase"]], r["time"] - t0)
        if r.get("kind") == "event" and r.get("event") == "start":
            at.setdefault("workers_up", r["time"] - t0)
    if records:
        first = min(records)
        at["first_record"] = run["seen_at"][first]
        at["first_record_kind"] = records[first].get("phase") or records[first].get("kind")
    metric = [s for s in sorted(records) if records[s].get("kind") in ("train", "eval")]
    if metric:
        at["first_metric"] = run["seen_at"][metric[0]]
        at["first_metric_kind"] = records[metric[0]]["kind"]
    train = [s for s in sorted(records) if records[s].get("kind") == "train"]
    if train:
        seq = train[0]
        at["first_step"] = records[seq]["time"] - t0
        at["visible"] = run["seen_at"][seq]
        parts = sorted(data.rglob(f"{run['job']}/metrics/part-*.jsonl"))
        holding = [p for p in parts if int(p.name[5:-6]) <= seq]
        if holding:
            at["relayed"] = holding[-1].stat().st_mtime - t0
        with sqlite3.connect(f"file:{data / 'slimtrain.db'}?mode=ro", uri=True) as db:
            for raw, created in db.execute(
                "SELECT data, created_at FROM events WHERE job_id = ? AND type = 'metric'", (run["job"],)
            ):
                if json.loads(raw).get("seq") == seq:
                    at["ingested"] = created - t0
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in at.items()}


def measure(label: str, code: Path, extra: dict[str, str], runs: int, settle: float) -> dict:
    spec = yaml.safe_load(SPEC.read_text())
    with tempfile.TemporaryDirectory(prefix="slimtrain-first-metric-") as tmp:
        data = Path(tmp)
        proc, url, ray_address = start_serve(data, code, extra)
        rows = []
        try:
            c = Client(url, TOKEN)
            ray = ray_client(ray_address)
            warm = follow(c, ray, spec, "warm-up")  # the cluster's first job pays for its start
            print(f"[{label}] warm-up: {breakdown(warm, data)}", flush=True)
            time.sleep(settle)
            for i in range(runs):
                load, idle = os.getloadavg()[0], idle_workers(proc.pid)
                run = follow(c, ray, spec, f"first-metric-{i}")
                row = {
                    "run": i + 1,
                    "job": run["job"],
                    "load_1min": round(load, 2),
                    **idle,
                    **breakdown(run, data),
                }
                row["import_ray_train_torch_s"] = round(import_seconds("ray.train.torch"), 3)
                row["import_torch_s"] = round(import_seconds("torch"), 3)
                print(f"[{label}] {row}", flush=True)
                rows.append(row)
                time.sleep(settle)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"label": label, "code": str(code), "env": extra, "machine": machine(), "runs": rows}


def summary(variant: dict) -> dict:
    out = {}
    keys = [
        *MILESTONES,
        "first_record",
        "first_metric",
        "import_ray_train_torch_s",
        "import_torch_s",
        "load_1min",
        "idle_workers",
    ]
    for k in keys:
        xs = [r[k] for r in variant["runs"] if isinstance(r.get(k), int | float) and r[k] == r[k]]
        if xs:
            out[k] = {"median": round(statistics.median(xs), 3), "max": round(max(xs), 3), "n": len(xs)}
    return out


def plot(variants: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 1.8 + 0.5 * len(variants)), layout="constrained")
    colors = plt.get_cmap("tab20").colors
    starred = False  # one legend entry for the stars
    for y, v in enumerate(variants):
        s = v["summary"]
        prev = 0.0
        for i, k in enumerate(MILESTONES):
            if k not in s:
                continue
            t = s[k]["median"]
            ax.barh(y, max(t - prev, 0), left=prev, color=colors[i], label=k if y == 0 else None)
            prev = max(prev, t)
        if "first_record" in s:
            ax.plot([s["first_record"]["median"]], [y], "k^", label="first record" if y == 0 else None)
        if "first_metric" in s:
            ax.plot([s["first_metric"]["median"]], [y], "r*", ms=9, label=None if starred else "first metric")
            starred = True
    ax.set_yticks(range(len(variants)), [v["label"] for v in variants])
    ax.axvline(5, color="grey", ls="--", lw=1)
    ax.set_xlabel("seconds after POST (median of the runs)")
    ax.set_title("POST -> first train metric visible through the API (bars), first metric (star)")
    # below the axes at a fixed distance, however many variants there are
    fig.legend(fontsize=7, ncol=6, loc="outside lower center")
    fig.savefig(path, dpi=120)


def process_started_at(pid: int) -> float:
    """Wall-clock time the process started, to the kernel's clock tick (10 ms). Not psutil's
    create_time(): it adds the boot time, which /proc/stat gives in whole seconds, so it can read
    up to 1 s early. This takes the process's age from /proc/uptime instead; NaN once it ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # field 22 (starttime, clock ticks since boot), counted after the ")" that ends comm
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        now = time.time()
    except (OSError, IndexError, ValueError):
        return float("nan")
    return now - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def combine(labels: list[str], described: dict[str, str] | None = None) -> None:
    variants = []
    for label in labels:
        v = json.loads((out_dir("api_first_metric") / f"{label}.json").read_text())
        v["summary"] = summary(v)
        if described and label in described:
            v["described"] = described[label]
        variants.append(v)
    out = results_dir("api_first_metric")
    cols = [
        *MILESTONES,
        "first_record",
        "first_metric",
        "import_ray_train_torch_s",
        "import_torch_s",
        "load_1min",
        "idle_workers",
    ]
    text = []
    for v in variants:
        m = v["machine"]
        env = " ".join(f"{k}={val}" for k, val in v["env"].items()) or "none"
        what = f" ({v['described']})" if v.get("described") else ""
        text.append(
            f"### {v['label']}\n\n{conditions(m)} Server code: `{v['code']}`{what}; extra env: {env}.\n"
        )
        if len([r for r in v["runs"] if "visible" in r]) < len(v["runs"]):
            text.append("A run without milestones past `ray_running` saw no record within the 300 s limit.\n")
        rows = [[r["run"], *[r.get(k, "-") for k in cols]] for r in v["runs"]]
        s = v["summary"]
        rows.append(["median", *[s[k]["median"] if k in s else "-" for k in cols]])
        rows.append(["max", *[s[k]["max"] if k in s else "-" for k in cols]])
        text.append(markdown_table(["run", *cols], rows) + "\n")
    head = ["milestone (median s from POST)", *[v["label"] for v in variants]]
    side = [[k, *[v["summary"].get(k, {}).get("median", "-") for v in variants]] for k in cols]
    doc = (
        "# POST -> first metric, broken down\n\n"
        "`python -m bench.api.first_metric` (see its docstring for each milestone). Seconds from "
        "just before the POST; each run cancelled once its first train record was visible.\n\n"
        + markdown_table(head, side)
        + "\n\n"
        + "\n".join(text)
    )
    (out / "table.md").write_text(doc)
    save_json(out / "results.json", {"milestones": MILESTONES, "variants": variants})
    plot(variants, out / "first_metric.png")
    print(doc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="head")
    p.add_argument("--code", type=Path, default=ROOT, help="source tree the server runs from")
    p.add_argument("--env", action="append", default=[], help="K=V for the server's environment")
    p.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "5")))
    p.add_argument("--settle", type=float, default=5.0, help="seconds between runs")
    p.add_argument("--combine", nargs="+", metavar="LABEL", help="write the results of these variants")
    p.add_argument("--describe", action="append", default=[], help="LABEL=what the variant's code is")
    a = p.parse_args()
    if a.combine:
        combine(a.combine, dict(kv.split("=", 1) for kv in a.describe))
        return
    extra = dict(kv.split("=", 1) for kv in a.env)
    v = measure(a.label, a.code.resolve(), extra, a.runs, a.settle)
    save_json(out_dir("api_first_metric") / f"{a.label}.json", v)
    combine([a.label])


if __name__ == "__main__":
    main()
