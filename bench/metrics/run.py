"""Metrics cost vs job length (issue 17.2; not part of the test suite): `python -m bench.metrics.run`.

Drives the two ends of the metrics stream directly, at a steady rate, rather than a training job
(200,000 records would take hours of real training): a writer thread does what the driver's
pump does (adds the records due, `MetricsLog.flush()` at most every second, polls every 0.25 s)
and an ingester thread does what the API's ingest loop does for one live job
(`Ingester.ingest_job` every 0.5 s into a real SQLite job store). Each thread's own CPU time
(`time.thread_time`) is sampled; the figure is CPU seconds per wall second over the first and
the last tenth of the job, and their ratio (target <= 1.2).

Cases: the append-only parts (this design) with `--records` records, on a local folder and on S3
(moto's server on loopback, as tests/plugins/s3.py); and the design it replaced (`legacy`: the
whole metrics.jsonl rewritten at each flush and read whole by the API, `Ingester._ingest_whole`,
the path kept for series an older driver wrote) with `--legacy-records`, for comparison.
Writes bench/results/metrics/{results.json,table.md,cost.png}."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import conditions, machine, markdown_table, results_dir, save_json
from service.artifacts import ArtifactStore, JobArtifacts, LocalArtifactStore
from service.ingest import Ingester
from service.records import METRICS
from service.store.db import Database
from service.store.repo import NewJob, Store
from workers.metrics_log import MetricsLog

JOB = "bench-job"
POLL_S, INGEST_S = 0.25, 0.5  # the driver's pump and the API's ingest interval


class LegacyLog(MetricsLog):
    """The writer this replaced: metrics.jsonl rewritten whole at each flush."""

    def flush(self, force: bool = False) -> None:
        if self.dirty and (force or time.monotonic() - self.last >= self.interval):
            self.arts.put_bytes(METRICS, ("\n".join(self.lines) + "\n").encode())
            self.written = len(self.lines)
            self.last = time.monotonic()


def record(step: int) -> dict:
    # The shape of a train record (workers.train_loop), with plausible values.
    return {
        "kind": "train",
        "step": step,
        "epoch": step // 1000,
        "loss": 2.0 / (1 + step / 1000),
        "lr": 0.05,
        "sparsity": min(0.9, step / 200_000),
        "grad_norm": 1.234567,
        "samples_per_second": 5123.4,
        "time": 1.7e9 + step / 100,
    }


def run_case(artifacts: ArtifactStore, design: str, n: int, rate: float, work: Path) -> dict:
    db = Database(f"sqlite:///{work / f'{design}-{id(artifacts)}.db'}")
    db.upgrade()
    store = Store(db)
    store.create_job(NewJob(JOB, "bench", "bench", {"name": "bench"}, 0, 1))
    arts = JobArtifacts(artifacts, JOB)
    ingester = Ingester(store, artifacts)
    writer_samples: list[tuple[float, float, int]] = []
    api_samples: list[tuple[float, float, int]] = []
    done = threading.Event()
    t0 = time.monotonic()

    def writer():
        log = (MetricsLog if design == "parts" else LegacyLog)(arts)
        step = 0
        while step < n:
            due = min(n, int((time.monotonic() - t0) * rate))
            for s in range(step, due):
                log.add(record(s))
            step = due
            log.flush()
            writer_samples.append((time.monotonic() - t0, time.thread_time(), step))
            time.sleep(POLL_S)
        log.flush(force=True)
        writer_samples.append((time.monotonic() - t0, time.thread_time(), step))
        done.set()

    ingest = store.ingest

    def ingest_and_sample(job_id, first, records):
        # A sample per part stored: a tick that catches up on many parts is not one long gap.
        ok = ingest(job_id, first, records)
        api_samples.append((time.monotonic() - t0, time.thread_time(), first + len(records)))
        return ok

    store.ingest = ingest_and_sample

    def api():
        have = 0
        while have < n:
            if design == "parts":
                have += ingester.ingest_job(JOB, have)
            else:
                have += ingester._ingest_whole(arts, JOB, have)
            api_samples.append((time.monotonic() - t0, time.thread_time(), have))
            if have < n:
                time.sleep(INGEST_S)

    threads = [threading.Thread(target=writer), threading.Thread(target=api)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = writer_samples[-1][0]  # the job's length: its last record written
    stored = len(store.metrics(JOB, limit=n + 10).items)
    db.dispose()
    out = {
        "design": design,
        "records": n,
        "rate_per_s": rate,
        "seconds": end,
        "stored": stored,
        "writer": tenths(writer_samples, end),
        "api": tenths(api_samples, end),
    }
    for side in ("writer", "api"):
        t = out[side]
        out[f"{side}_first"], out[f"{side}_last"] = t[0], t[-1]
        out[f"{side}_ratio"] = t[-1] / t[0] if t[0] > 0 else float("nan")
    return out


def tenths(samples: list[tuple[float, float, int]], end: float) -> list[float]:
    """CPU seconds per wall second in each tenth of [0, end], from (wall, cpu, records) samples."""

    def cpu_at(t: float) -> float:
        # The CPU time of the last sample at or before t (samples are dense: every 0.25-0.5 s).
        best = 0.0
        for wall, cpu, _ in samples:
            if wall > t:
                break
            best = cpu
        return best

    out = []
    for i in range(10):
        a, b = end * i / 10, end * (i + 1) / 10
        out.append((cpu_at(b) - cpu_at(a)) / (b - a))
    return out


def s3_store(work: Path):
    """moto's S3 server on loopback (as tests/plugins/s3.py) and a store on a new bucket."""
    from service.s3_store import S3ArtifactStore, make_client
    from tests.plugins.s3 import CREDENTIALS, REGION, _wait_listening
    from tests.raycluster import free_port

    port = free_port()
    log = work / "moto.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    _wait_listening(port, proc, log)
    url = f"http://127.0.0.1:{port}"
    make_client(url, REGION, CREDENTIALS).create_bucket(Bucket="bench")
    return proc, S3ArtifactStore("s3://bench", url, region=REGION, credentials=CREDENTIALS)


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, side in zip(axes, ("writer", "api"), strict=True):
        for c in cases:
            ax.plot(
                range(1, 11), c[side], marker="o", label=f"{c['design']} / {c['store']} ({c['records']:,})"
            )
        ax.set_title(f"{'driver-side writer' if side == 'writer' else 'API ingest'}: CPU s per s")
        ax.set_xlabel("tenth of the job")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=200_000)
    # A rate the API's SQLite ingest keeps up with on a busy 2-CPU machine: 200,000 records in
    # under 7 minutes, where a real job logging every step would take hours.
    p.add_argument("--rate", type=float, default=500.0, help="records per second")
    p.add_argument("--legacy-records", type=int, default=20_000, help="0: skip the old design")
    p.add_argument("--stores", default="local,s3")
    args = p.parse_args(argv)
    out = results_dir("metrics")
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        procs = []
        try:
            for name in args.stores.split(","):
                if name == "local":
                    artifacts: ArtifactStore = LocalArtifactStore(work / "local")
                else:
                    proc, artifacts = s3_store(work)
                    procs.append(proc)
                plan = [("parts", args.records)] + (
                    [("legacy", args.legacy_records)] if args.legacy_records else []
                )
                for design, n in plan:
                    artifacts.delete_prefix(JOB)  # each case starts a new series
                    c = run_case(artifacts, design, n, args.rate, work) | {"store": name}
                    cases.append(c)
                    print(json.dumps({k: v for k, v in c.items() if k not in ("writer", "api")}), flush=True)
                    artifacts.delete_prefix(JOB)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait()
    m = machine()
    save_json(out / "results.json", {"machine": m, "args": vars(args), "cases": cases})
    rows = [
        [
            c["design"],
            c["store"],
            f"{c['records']:,}",
            round(c["seconds"], 1),
            c["stored"] == c["records"],
            round(c["writer_first"] * 100, 2),
            round(c["writer_last"] * 100, 2),
            round(c["writer_ratio"], 2),
            round(c["api_first"] * 100, 2),
            round(c["api_last"] * 100, 2),
            round(c["api_ratio"], 2),
        ]
        for c in cases
    ]
    table = markdown_table(
        [
            "design",
            "store",
            "records",
            "s",
            "all stored once",
            "writer % core, first tenth",
            "last tenth",
            "ratio",
            "API ingest % core, first tenth",
            "last tenth",
            "ratio",
        ],
        rows,
    )
    (out / "table.md").write_text(f"{table}\n\n{conditions(m)} Rate {args.rate:g} records/s.\n")
    plot(cases, out / "cost.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
