"""In-memory vs Ray Data streamed datasets: per-worker peak memory and training throughput against
the dataset's size, side by side in one run.

For each size a deterministic parquet file (float32 features in one list column, 4 classes,
row groups of 2,000 rows) goes into a local artifact store, and the same 2-worker DDP job (an MLP
whose step is not trivially cheap) runs twice through the real driver on an embedded 2-CPU Ray
head: `data.streaming: off` (the whole set loaded, ray.put and copied into each worker) and `on`
(read by Ray Data in one execution across epochs, read tasks of up to 4,096 rows, each worker
iterating its shard). Each run trains `--steps` optimizer steps.

- peak RSS per worker: the larger of the two workers' peak resident memory over the training
  loop (sampled every 50 ms from /proc/self/status: VmRSS, and RssAnon, the private part, which
  leaves out Ray object-store pages read zero-copy), and the RSS when its session started,
  before it fetched any data (the training loop's `worker_memory` record);
- samples/s: the median over the loop's logging windows (the first left out: warm-up) of the
  global samples per second, so the job's start, evaluation and export do not count;
- CPU per sample: the CPU seconds of the bench's whole process tree (driver, Ray, workers, Ray
  Data tasks) from the first logging window to the last before the final step, per sample: what
  a dedicated 2-CPU machine's throughput would follow if the job is CPU-bound, and a figure that
  other processes on a shared machine do not move (samples/s they do).

    .venv/bin/python -m bench.data [--rows 10000 31623 100000] [--features 256] [--steps 300]

Writes results.json, table.md and data.png to bench/results/data/ (BENCH_OUT redirects).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import conditions, machine, markdown_table, results_dir, save_json
from bench.proctree import TreeCpu

MIB = 2**20
ROW_GROUP = 2_000


def write_parquet(path: Path, n: int, f: int, seed: int = 0) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 4).astype(np.int64)
    x = (rng.standard_normal((n, f), dtype=np.float32) + y[:, None]).astype(np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), f)
    pq.write_table(pa.table({"x": col, "label": y}), path, row_group_size=ROW_GROUP)
    return x.nbytes


def job(name: str, mode: str, steps: int, hidden: list[int], batch: int) -> dict:
    return {
        "name": f"data-{mode}",
        "model": {"name": "mlp", "args": {"hidden": hidden}},
        "data": {
            "uri": f"store://datasets/{name}",
            "resolved_uri": f"datasets/{name}",
            "feature_columns": ["x"],
            "label_column": "label",
            "streaming": mode,
        },
        "train": {
            "epochs": 10_000,
            "max_steps": steps,
            "batch_size": batch,
            "lr": 0.02,
            "seed": 0,
            "log_every_steps": 20,
            "eval_every_steps": steps,
        },
        "parallel": {"strategy": "ddp", "workers": 2},
        "checkpoint": {"every_steps": steps},
        "retries": 0,
    }


def run_one(store, name: str, mode: str, args) -> dict:
    from service.spec import parse_spec
    from workers.driver import run_job

    records: list[dict] = []
    # CPU seconds of this process's whole tree (the driver, the embedded Ray head, the training
    # workers, Ray Data's tasks) each time the driver hands over train records (every 0.25 s).
    cpu, marks = TreeCpu(os.getpid()), []

    def on_record(rec: dict) -> None:
        records.append(rec)
        if rec.get("kind") == "train":
            marks.append((rec["step"], cpu.read()))

    t0 = time.time()
    rep = run_job(
        parse_spec(job(name, mode, args.steps, args.hidden, args.batch)),
        f"{Path(name).stem}-{mode}",
        store,
        on_record=on_record,
    )
    # From the first train record to the last before the final step (whose window ends in the
    # last evaluation and the export): CPU per sample of the training loop alone.
    first, last = marks[0], [m for m in marks if m[0] < args.steps][-1]
    cpu_per_sample = (last[1] - first[1]) / max((last[0] - first[0]) * args.batch, 1)
    done = next(r for r in records if r.get("event") == "done")
    windows = [r["samples_per_second"] for r in records if r.get("kind") == "train"][1:]
    mem = done["worker_memory"]
    return {
        "mode": mode,
        "samples_per_second": statistics.median(windows),
        "windows": windows,
        "loop_samples_per_second": done["samples_per_second"],
        "steps": done["step"],
        "peak_rss_mib": max(m["peak"]["rss"] for m in mem) / MIB,
        "peak_private_mib": max(m["peak"]["anon"] for m in mem) / MIB,
        "start_rss_mib": max(m["start"]["rss"] for m in mem) / MIB,
        "worker_memory": mem,
        "accuracy": rep["accuracy"],
        "job_seconds": time.time() - t0,
        "cpu_ms_per_1000_samples": cpu_per_sample * 1e6,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, label in (("off", "in memory"), ("on", "Ray Data streamed")):
        rs = [r for r in rows if r["mode"] == mode]
        size = [r["dataset_mib"] for r in rs]
        a.plot(size, [r["peak_rss_mib"] for r in rs], "o-", label=label)
        b.plot(size, [r["samples_per_second"] for r in rs], "o-", label=label)
    a.set(xscale="log", xlabel="dataset features (MiB)", ylabel="peak RSS per worker (MiB)")
    b.set(xscale="log", xlabel="dataset features (MiB)", ylabel="training samples/s (2 workers)")
    a.legend()
    b.legend()
    fig.suptitle("bench/data: 2-worker DDP, in memory vs streamed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 31_623, 100_000])
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()

    from service.artifacts import LocalArtifactStore
    from workers.ray_runtime import connect

    connect(None, num_cpus=2, log_to_driver=False)
    out = results_dir("data")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalArtifactStore(Path(tmp) / "store")
        for n in args.rows:
            name = f"rows{n}.parquet"
            src = Path(tmp) / name
            nbytes = write_parquet(src, n, args.features)
            store.put_file(f"datasets/{name}", src)
            for mode in ("off", "on"):
                r = run_one(store, name, mode, args)
                r.update(rows=n, dataset_mib=nbytes / MIB, file_mib=src.stat().st_size / MIB)
                rows.append(r)
                print(
                    f"{n} rows ({nbytes / MIB:.0f} MiB) {mode}: peak {r['peak_rss_mib']:.0f} MiB, "
                    f"{r['samples_per_second']:.0f} samples/s",
                    flush=True,
                )

    def pick(mode):
        return [r for r in rows if r["mode"] == mode]

    st, mem = pick("on"), pick("off")
    flat = st[-1]["peak_rss_mib"] / st[0]["peak_rss_mib"]
    speed = [s["samples_per_second"] / m["samples_per_second"] for s, m in zip(st, mem, strict=True)]
    # The throughput a dedicated machine would show, were the job CPU-bound: samples per CPU
    # second. Unlike samples/s, it does not change when other processes take the cores.
    per_cpu = [
        m["cpu_ms_per_1000_samples"] / s["cpu_ms_per_1000_samples"] for s, m in zip(st, mem, strict=True)
    ]
    summary = {
        "streamed_memory_largest_over_smallest": flat,
        "streamed_over_in_memory_samples_per_second": speed,
        "streamed_over_in_memory_samples_per_cpu_second": per_cpu,
        "targets": {"memory_flat_max": 1.2, "throughput_min": 0.9},
        "memory_target_met": flat <= 1.2,
        "throughput_target_met": min(speed) >= 0.9,
    }
    m = machine()
    save_json(out / "results.json", {"args": vars(args), "machine": m, "runs": rows, "summary": summary})
    table = markdown_table(
        [
            "rows",
            "features MiB",
            "path",
            "peak RSS/worker MiB",
            "of which private MiB",
            "RSS at start MiB",
            "samples/s",
            "streamed/in-memory samples/s",
            "CPU ms / 1000 samples",
            "streamed/in-memory samples per CPU s",
            "accuracy",
        ],
        [
            [
                r["rows"],
                round(r["dataset_mib"], 1),
                "in memory" if r["mode"] == "off" else "streamed",
                round(r["peak_rss_mib"]),
                round(r["peak_private_mib"]),
                round(r["start_rss_mib"]),
                round(r["samples_per_second"]),
                round(s["samples_per_second"] / mm["samples_per_second"], 2) if r["mode"] == "on" else "",
                round(r["cpu_ms_per_1000_samples"]),
                round(mm["cpu_ms_per_1000_samples"] / s["cpu_ms_per_1000_samples"], 2)
                if r["mode"] == "on"
                else "",
                round(r["accuracy"], 3),
            ]
            for mm, s in zip(mem, st, strict=True)
            for r in (mm, s)
        ],
    )
    (out / "table.md").write_text(
        f"{conditions(m)}\n\n2 DDP workers, mlp hidden {args.hidden}, global batch {args.batch}, "
        f"{args.steps} steps, {args.features} float32 features, row groups of {ROW_GROUP} rows.\n\n"
        f"{table}\n\nStreamed peak RSS, largest/smallest dataset: {flat:.2f} (target <= 1.2); "
        f"streamed/in-memory samples/s: {', '.join(f'{s:.2f}' for s in speed)} (target >= 0.9); "
        f"samples per CPU second (other load aside): {', '.join(f'{s:.2f}' for s in per_cpu)}.\n"
    )
    plot(rows, out / "data.png")
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
