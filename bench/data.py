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
  global samples per second, so the job's start, evaluation and export do not count, pooled
  over `--rounds` runs of each mode whose order alternates (off on, on off): one run's windows
  move by 2x on this shared machine;
- CPU per sample: the CPU seconds of the bench's whole process tree (driver, Ray, workers, Ray
  Data tasks) from the first logging window to the last before the final step, per sample: what
  a dedicated 2-CPU machine's throughput would follow if the job is CPU-bound, and a figure that
  other processes on a shared machine do not move (samples/s they do).

    .venv/bin/python -m bench.data [--rows 10000 31623 100000] [--features 256] [--steps 300] [--rounds 2]

Writes results.json, table.md and data.png to bench/results/data/ (BENCH_OUT redirects).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import conditions, machine, markdown_table, results_dir, save_json
from bench.proctree import TreeCpu

MIB = 2**20
ROW_GROUP = 2_000
TICK = os.sysconf("SC_CLK_TCK")


def _title(proc) -> str:
    """What a process of the tree is: Ray sets a worker's title to its actor or task
    ("ray::RayTrainWorker.train_func", "ray::SplitCoordinator", "ray::MapBatches(read_train)"),
    the others are named by their executable (raylet, gcs_server, python for the driver)."""
    cmd = proc.cmdline()
    head = cmd[0] if cmd else proc.name()
    if head.startswith("ray::"):
        return re.sub(r"\s.*", "", head)
    return Path(head).name if not head.endswith("python") else " ".join(Path(c).name for c in cmd[:3])


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of one process, by thread name (/proc/PID/task/*/stat)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        name = re.sub(r"\d+$", "N", name)  # numbered pools (ThreadPoolExecutor-0_1) as one
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


class PartCpu:
    """CPU seconds of the bench's process tree by part: each process by its title, and the
    threads of the training workers and the split coordinator by thread name, so a run says
    where the CPU a sample costs goes (a Ray worker process changes title per task: the CPU
    between two readings is counted under the title at the second)."""

    THREADED = ("ray::RayTrainWorker", "ray::SplitCoordinator", "ray::_RayTrainWorker")

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.last: dict = {}
        self.total: dict[str, float] = {}
        self.born: dict[str, int] = {}  # processes started since reset(), by their first title

    def read(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                with p.oneshot():
                    key, title = (p.pid, p.create_time()), _title(p)
                    c = p.cpu_times()
                    now = {"": c.user + c.system}
                if title.startswith(self.THREADED):
                    now.update({f" / {t}": v for t, v in thread_cpu(p.pid).items()})
            except (psutil.Error, OSError):
                continue
            if key not in self.last and self.last:
                self.born[title] = self.born.get(title, 0) + 1
            before = self.last.get(key, {})  # a process born since the last reading: all of it
            for part, v in now.items():
                d = v - before.get(part, 0.0)
                self.total[title + part] = self.total.get(title + part, 0.0) + d
            self.last[key] = now

    def reset(self) -> None:
        self.read()
        self.total, self.born = {}, {}


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


def run_one(store, name: str, mode: str, args, round_: int = 0) -> dict:
    from service.spec import parse_spec
    from workers.driver import run_job

    records: list[dict] = []
    # CPU seconds of this process's whole tree (the driver, the embedded Ray head, the training
    # workers, Ray Data's tasks) each time the driver hands over train records (every 0.25 s).
    cpu, marks = TreeCpu(os.getpid()), []
    parts, part_steps = PartCpu(os.getpid()), []

    def on_record(rec: dict) -> None:
        records.append(rec)
        if rec.get("kind") == "train":
            marks.append((rec["step"], cpu.read()))
            if rec["step"] < args.steps:
                if not part_steps:
                    parts.reset()
                else:
                    parts.read()
                part_steps.append(rec["step"])

    t0 = time.time()
    rep = run_job(
        parse_spec(job(name, mode, args.steps, args.hidden, args.batch)),
        f"{Path(name).stem}-{mode}-{round_}",  # a job id of its own: one already run would resume
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
    samples = max((part_steps[-1] - part_steps[0]) * args.batch, 1)
    by_part = {k: v / samples * 1e6 for k, v in sorted(parts.total.items(), key=lambda kv: -kv[1]) if v > 0}
    return {
        "cpu_ms_per_1000_samples_by_part": by_part,
        "processes_started_in_loop": parts.born,
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


def pooled(runs: list[dict], n: int, mode: str) -> dict:
    """One size's runs of one mode, every round together: samples/s the median of all their
    logging windows, CPU per sample the median of the runs', memory the largest peak."""
    rs = [r for r in runs if (r["rows"], r["mode"]) == (n, mode)]
    return {
        "rows": n,
        "mode": mode,
        "rounds": len(rs),
        "dataset_mib": rs[0]["dataset_mib"],
        "samples_per_second": statistics.median(w for r in rs for w in r["windows"]),
        "cpu_ms_per_1000_samples": statistics.median(r["cpu_ms_per_1000_samples"] for r in rs),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
        "peak_private_mib": max(r["peak_private_mib"] for r in rs),
        "start_rss_mib": max(r["start_rss_mib"] for r in rs),
        "accuracy": min(r["accuracy"] for r in rs),
    }


# What each process (or thread) of the tree is, for the profile's table: a title's prefix -> part.
GROUPS = (
    ("ray::RayTrainWorker / ray::", "training workers: Python threads (steps, batches, prefetch)"),
    ("ray::RayTrainWorker / ", "training workers: native threads (gloo, Ray core)"),
    ("ray::RayTrainWorker", None),  # the processes' totals: the threads above split them
    ("ray::SplitCoordinator / ", None),
    ("ray::SplitCoordinator", "Ray Data split coordinator (the streaming executor)"),
    ("ray::MapBatches", "Ray Data read tasks"),
    ("ray::IDLE", "Ray Data read tasks"),  # a task worker's title between its tasks
    ("ray::_StatsActor", "Ray Data stats actor"),
    ("python -m bench.data", "driver (bench process)"),
    ("ray::", "Ray Train and Ray actors"),
    ("", "Ray system (raylet, GCS, dashboard, log monitor)"),
)


def group(part: str) -> str | None:
    return next(name for prefix, name in GROUPS if part.startswith(prefix))


def write_profile(rows: list[dict], args, out: Path) -> None:
    """profile.json and profile.md: CPU ms per 1000 samples of each part of the process tree,
    in memory vs streamed, at each size."""
    m = machine()
    save_json(out / "profile.json", {"args": vars(args), "machine": m, "runs": rows})
    lines = []
    for n in args.rows:
        by = {r["mode"]: r for r in rows if r["rows"] == n}
        grouped = {mode: {} for mode in by}
        for mode, r in by.items():
            for part, ms in r["cpu_ms_per_1000_samples_by_part"].items():
                g = group(part)
                if g is not None:
                    grouped[mode][g] = grouped[mode].get(g, 0.0) + ms
        names = [name for _, name in GROUPS if name is not None]
        names = list(dict.fromkeys(names))
        table = [
            [
                name,
                *(round(grouped[mode].get(name, 0.0), 1) for mode in by),
                *(
                    [round(grouped["on"].get(name, 0.0) - grouped["off"].get(name, 0.0), 1)]
                    if len(by) == 2
                    else []
                ),
            ]
            for name in names
        ]
        table.append(
            [
                "whole tree (as in the results)",
                *(round(r["cpu_ms_per_1000_samples"], 1) for r in by.values()),
                *(
                    [round(by["on"]["cpu_ms_per_1000_samples"] - by["off"]["cpu_ms_per_1000_samples"], 1)]
                    if len(by) == 2
                    else []
                ),
            ]
        )
        heads = ["part", *("in memory" if mode == "off" else "streamed" for mode in by)]
        heads += ["streamed - in memory"] if len(by) == 2 else []
        lines.append(f"{n} rows, CPU ms per 1000 samples:\n\n{markdown_table(heads, table)}\n")
    (out / "profile.md").write_text(
        f"{conditions(m)}\n\n2 DDP workers, mlp hidden {args.hidden}, global batch {args.batch}, "
        f"{args.steps} steps, {args.features} float32 features, row groups of {ROW_GROUP} rows.\n\n"
        + "\n".join(lines)
    )
    print((out / "profile.md").read_text())


def iteration_cost(path: Path, args) -> dict:
    """CPU a training worker's batch iteration costs, without training: this process reads one
    file's streamed training split through Feed (blocks of the local iterator, cut into batches, as
    LocalSession does), batches of the per-rank size, after letting the reads run ahead. The
    main thread's CPU is Feed and Ray Data's batch iterator as the training thread runs them;
    the process's adds the prefetch thread and, here only, the streaming executor (in a job it
    runs in the split coordinator) and the read tasks' result handling."""
    import pyarrow.fs as pafs

    from service.spec import DataSpec
    from workers.data import streaming

    spec = DataSpec.model_validate(
        {
            "uri": f"store://datasets/{path.name}",
            "resolved_uri": f"datasets/{path.name}",
            "feature_columns": ["x"],
            "label_column": "label",
            "streaming": "on",
        }
    )
    st = streaming.open_parquet(spec, str(path), pafs.LocalFileSystem())
    per_rank = args.batch // 2
    spe = st.info.n_train // per_rank  # one rank's epochs, 2 of them
    feed = streaming.Feed(st.local_shards(0, per_rank, spe, 2 * spe), per_rank, spe, 0, rank=0, world=1)
    feed.train_batch(0)
    time.sleep(5)  # the read tasks run ahead, as they do while a worker trains
    proc, main = time.process_time(), time.thread_time()
    steps = min(spe * 2, 400)
    for step in range(1, steps):
        feed.train_batch(step)
    n = (steps - 1) * per_rank
    return {
        "samples": n,
        "main_thread_cpu_us_per_sample": (time.thread_time() - main) / n * 1e6,
        "process_cpu_us_per_sample": (time.process_time() - proc) / n * 1e6,
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
    ap.add_argument("--modes", nargs="+", choices=["off", "on"], default=["off", "on"])
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="runs of each mode per size, the order reversed each round (off on, on off, ...); "
        "--profile and --iteration run one",
    )
    ap.add_argument(
        "--iteration",
        action="store_true",
        help="measure only the batch iteration's CPU (iteration.json), at the first --rows",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="write profile.json and profile.md (CPU by part, in memory vs streamed) instead of the results",
    )
    args = ap.parse_args()

    from service.artifacts import LocalArtifactStore
    from workers import onnx_export
    from workers.ray_runtime import connect

    connect(None, num_cpus=2, log_to_driver=False)
    out = results_dir("data")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalArtifactStore(Path(tmp) / "store")
        if args.iteration:
            src = Path(tmp) / "rows.parquet"
            write_parquet(src, args.rows[0], args.features)
            got = {"args": vars(args), "machine": machine(), **iteration_cost(src, args)}
            save_json(out / "iteration.json", got)
            print(got, flush=True)
            return
        # The driver warms the ONNX exporter up while a job trains, and the first time in a process
        # costs several CPU seconds more than later ones: paid here, it does not slow whichever
        # run comes first (it cost the first, in-memory, run 70-86 CPU ms per 1000 samples).
        onnx_export.warm_up().join()
        for n in args.rows:
            name = f"rows{n}.parquet"
            src = Path(tmp) / name
            nbytes = write_parquet(src, n, args.features)
            store.put_file(f"datasets/{name}", src)
            rounds = 1 if args.profile else args.rounds
            for k in range(rounds):
                for mode in args.modes if k % 2 == 0 else args.modes[::-1]:
                    r = run_one(store, name, mode, args, k)
                    r.update(rows=n, round=k, dataset_mib=nbytes / MIB, file_mib=src.stat().st_size / MIB)
                    runs.append(r)
                    print(
                        f"{n} rows ({nbytes / MIB:.0f} MiB) {mode}, round {k + 1}: "
                        f"peak {r['peak_rss_mib']:.0f} MiB, "
                        f"{r['samples_per_second']:.0f} samples/s, "
                        f"{r['cpu_ms_per_1000_samples']:.0f} CPU ms / 1000 samples, of which:",
                        flush=True,
                    )
                    for part, ms in list(r["cpu_ms_per_1000_samples_by_part"].items())[:40]:
                        print(f"    {ms:7.1f}  {part}", flush=True)
                    print(f"    processes started in the loop: {r['processes_started_in_loop']}", flush=True)
    if args.profile:
        write_profile(runs, args, out)
        return
    if args.modes != ["off", "on"]:
        return  # one path only: no comparison to write

    rows = [pooled(runs, n, mode) for n in args.rows for mode in ("off", "on")]

    def pick(mode):
        return [r for r in rows if r["mode"] == mode]

    def speed_in(n: int, k: int) -> float:
        on, off = (
            next(r for r in runs if (r["mode"], r["rows"], r["round"]) == (m, n, k)) for m in ("on", "off")
        )
        return on["samples_per_second"] / off["samples_per_second"]

    st, mem = pick("on"), pick("off")
    # Each round's own ratio, beside the pooled one: how far one pair of runs moves here.
    by_round = [[speed_in(n, k) for k in range(args.rounds)] for n in args.rows]
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
        "streamed_over_in_memory_samples_per_second_by_round": by_round,
        "targets": {"memory_flat_max": 1.2, "throughput_min": 0.9},
        "memory_target_met": flat <= 1.2,
        "throughput_target_met": min(speed) >= 0.9,
    }
    m = machine()
    got = {"args": vars(args), "machine": m, "runs": runs, "pooled": rows, "summary": summary}
    save_json(out / "results.json", got)
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
        f"streamed/in-memory samples/s: {', '.join(f'{s:.2f}' for s in speed)} (target >= 0.9; "
        f"each round alone: {'; '.join(', '.join(f'{x:.2f}' for x in r) for r in by_round)}); "
        f"samples per CPU second (other load aside): {', '.join(f'{s:.2f}' for s in per_cpu)}.\n"
    )
    plot(rows, out / "data.png")
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
