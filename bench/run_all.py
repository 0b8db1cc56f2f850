"""Run every benchmark: `make bench` (= `python -m bench.run_all`).

    .venv/bin/python -m bench.run_all                 # quick mode: a few minutes, smoke-sized
    .venv/bin/python -m bench.run_all --full          # the published figures (about an hour here)
    .venv/bin/python -m bench.run_all --only load api # a subset; --list names them

Each bench runs as its own process (`python -m MODULE ARGS`), so one crash cannot take the others
down and every bench starts from a clean interpreter, as its README command does. Quick mode
shrinks each bench (fewer rounds, steps, seeds, clients) and sends every output under
`bench/out/quick/` (git-ignored, BENCH_OUT), so it never overwrites what `--full` writes: each
bench's committed results in bench/results/NAME/ (results.json, table.md, a plot).
Each bench's output is also kept in `bench/out/run_all/NAME.log`; the summary (status, seconds,
where the tables and plots went) is printed and written to `bench/out/run_all/summary.md`.
Exits 1 when any bench fails (non-zero exit or timeout), after running the rest.

A bench may report a status other than "ok" by printing a last line `bench status: WORDS`:
`gpu_check` on a machine without a GPU reports "not run: no GPU". That is listed as such and
does not fail the run; `--require-gpu` makes it a failure (gpu_check then exits 3).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import machine, markdown_table, out_dir

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bench:
    name: str
    module: str
    quick: list[str]
    full: list[str]
    quick_out: str
    full_out: str
    # Most benches take flags; bench.api.run reads its sizes from the environment.
    quick_env: dict[str, str] = field(default_factory=dict)
    full_env: dict[str, str] = field(default_factory=dict)
    takes_require_gpu: bool = False  # passed --require-gpu when run_all is


FULL_OUT = ROOT / "bench" / "results"  # committed (bench.common.results_dir)
QUICK_OUT = ROOT / "bench" / "out" / "quick"  # git-ignored


def _o(name: str) -> str:
    return str((FULL_OUT / name).relative_to(ROOT))


def _q(name: str) -> str:
    return str((QUICK_OUT / name).relative_to(ROOT))


BENCHES = [
    Bench(
        "api",
        "bench.api.run",
        [],
        [],
        _q("api"),
        _o("api"),
        quick_env={"BENCH_SECONDS": "2", "BENCH_JOBS": "1"},
    ),
    # Full: the stack comparison bench/README quotes ("API at one and two processes").
    Bench(
        "api_replicas",
        "bench.api.replicas",
        ["--dbs", "sqlite", "--seconds", "2", "--rounds", "1"],
        ["--stacks", "uvloop-httptools,asyncio-h11"],
        _q("api_replicas"),
        _o("api_replicas"),
    ),
    Bench(
        "ddp_parity",
        "bench.ddp_parity",
        ["--rounds", "1", "--steps", "100"],
        ["--rounds", "3"],
        _q("ddp_parity"),
        _o("ddp_parity"),
    ),
    Bench(
        "pruning_overhead",
        "bench.pruning_overhead",
        # Quick: lenet5 only, its steps past the end of its example schedule (600).
        ["--models", "lenet5", "--rounds", "1", "--steps", "620", "--update-repeats", "3"]
        + ["--out", _q("pruning_overhead")],
        [],
        _q("pruning_overhead"),
        _o("pruning_overhead"),
    ),
    Bench(
        "memory",
        "bench.memory.run",
        ["--layers", "2", "--embd", "64", "--worlds", "2", "--out", _q("memory")],
        [],
        _q("memory"),
        _o("memory"),
    ),
    Bench(
        "compression",
        "bench.compression.run",
        ["--seeds", "0", "--models", "mlp", "--latency-repeats", "20", "--out", _q("compression")],
        ["--out", _o("compression")],
        _q("compression"),
        _o("compression"),
    ),
    Bench(
        "finetune",
        "bench.finetune",
        # Quick: ResNet only, one seed, a quarter of each budget.
        ["--models", "resnet", "--seeds", "0", "--scale", "0.25"],
        [],
        _q("finetune"),
        _o("finetune"),
    ),
    Bench(
        "gpu_check",
        "bench.gpu_check",
        ["--steps", "5"],
        [],
        _q("gpu_check"),
        _o("gpu_check"),
        takes_require_gpu=True,
    ),
    Bench(
        "gpu_jobs",
        "bench.gpu_jobs",
        [],  # without a GPU: the dense digits job on the CPU; with one: every job, ~2 min on an H200
        [],
        _q("gpu_jobs"),
        _o("gpu_jobs"),
        takes_require_gpu=True,
    ),
    Bench(
        "data",
        "bench.data",
        ["--rows", "2000", "6325", "--steps", "60"],
        [],
        _q("data"),
        _o("data"),
    ),
    Bench(
        "metrics",
        "bench.metrics.run",
        ["--records", "5000", "--rate", "1000", "--legacy-records", "0", "--stores", "local"],
        [],
        _q("metrics"),
        _o("metrics"),
    ),
    Bench(
        "queue",
        "bench.queue.run",
        ["--depths", "0,1000", "--dbs", "sqlite", "--idle-s", "5", "--gets", "100"],
        [],
        _q("queue"),
        _o("queue"),
    ),
    Bench("load", "bench.load", ["--seconds", "30", "--clients", "50"], [], _q("load"), _o("load")),
    # Quick: a 1-minute soak exercises the sampling and the verdict (too short to be judged).
    Bench(
        "soak",
        "bench.load",
        ["--soak-minutes", "1", "--clients", "20"],
        ["--soak-minutes", "10"],
        _q("load_soak"),
        _o("load_soak"),
    ),
]


# A bench's own word on how it went (bench.gpu_check.STATUS_PREFIX).
STATUS_PREFIX = "bench status: "


def status_of(rc: int, elapsed: float, timeout: float, lines: list[str]) -> str:
    """`ok`, what the bench reported (`not run: no GPU`), or `failed (...)`; only the last
    starts with "failed"."""
    reported = [line[len(STATUS_PREFIX) :].strip() for line in lines if line.startswith(STATUS_PREFIX)]
    said = reported[-1] if reported else None
    if rc == 0:
        if said and said.startswith("failed"):  # a bench that exits 0 cannot also have failed
            return f"failed (exit 0): {said}"
        return said or "ok"
    if elapsed >= timeout:
        return f"failed (timeout {timeout:.0f} s)"
    return f"failed (exit {rc})" + (f": {said}" if said else "")


def failed(results: list[dict]) -> list[str]:
    return [r["bench"] for r in results if r["status"].startswith("failed")]


def run_one(b: Bench, full: bool, log_dir: Path, timeout: float, require_gpu: bool = False) -> dict:
    args = b.full if full else b.quick
    if require_gpu and b.takes_require_gpu:
        args = [*args, "--require-gpu"]
    extra = b.full_env if full else b.quick_env
    env = {**os.environ, **extra}
    if not full:
        env["BENCH_OUT"] = str(QUICK_OUT)
    cmd = [sys.executable, "-m", b.module, *args]
    shown = " ".join([*(f"{k}={v}" for k, v in extra.items()), "python", "-m", b.module, *args])
    log_path = log_dir / f"{b.name}.log"
    print(f"\n=== {b.name}: {shown}", flush=True)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        # A timer, not a check between lines: a hung bench may print nothing at all.
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            # Echo and keep every line: a failure's traceback is in the log, not only on screen.
            lines = []
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
                lines.append(line)
            rc = proc.wait()
        finally:
            timer.cancel()
    elapsed = time.monotonic() - t0
    status = status_of(rc, elapsed, timeout, lines)
    return {
        "bench": b.name,
        "status": status,
        "seconds": round(elapsed, 1),
        "outputs": b.full_out if full else b.quick_out,
        "log": str(log_path.relative_to(ROOT) if log_path.is_relative_to(ROOT) else log_path),
        "command": shown,
    }


def main() -> int:
    names = [b.name for b in BENCHES]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="The published figures (slow).")
    ap.add_argument("--only", nargs="+", choices=names, metavar="NAME", help=f"Some of: {', '.join(names)}.")
    ap.add_argument("--list", action="store_true", help="Print the benches and their commands, run nothing.")
    ap.add_argument(
        "--require-gpu",
        action="store_true",
        help="gpu_check without a GPU fails the run (default: listed as 'not run: no GPU').",
    )
    ap.add_argument(
        "--timeout-minutes", type=float, help="Per bench (default: 20 in quick mode, 120 with --full)."
    )
    args = ap.parse_args()
    chosen = [b for b in BENCHES if not args.only or b.name in args.only]
    if args.list:
        for b in chosen:
            for mode, a, e in (("quick", b.quick, b.quick_env), ("full", b.full, b.full_env)):
                env = " ".join(f"{k}={v}" for k, v in e.items())
                print(f"{b.name:17} {mode:6} {env + ' ' if env else ''}python -m {b.module} {' '.join(a)}")
        return 0
    timeout = 60 * (args.timeout_minutes or (120 if args.full else 20))
    log_dir = out_dir("run_all")
    started = time.monotonic()
    results = [run_one(b, args.full, log_dir, timeout, args.require_gpu) for b in chosen]
    mode = "full" if args.full else "quick"
    table = markdown_table(
        ["bench", "status", "seconds", "tables and plots", "log", "command"],
        [[r["bench"], r["status"], r["seconds"], r["outputs"], r["log"], r["command"]] for r in results],
    )
    m = machine()
    text = (
        f"bench.run_all ({mode} mode), {m['when']}, {m['cpus']} CPUs, load average at the end "
        f"{os.getloadavg()[0]:.1f}; {time.monotonic() - started:.0f} s in all\n\n{table}\n"
    )
    (log_dir / "summary.md").write_text(text)
    print("\n" + text)
    print(f"summary: {(log_dir / 'summary.md').relative_to(ROOT)}")
    not_ok = [
        f"{r['bench']} ({r['status']})"
        for r in results
        if r["status"] != "ok" and r["bench"] not in failed(results)
    ]
    if not_ok:
        print(f"NOT OK, not failed: {', '.join(not_ok)}", file=sys.stderr)
    if failed(results):
        print(f"FAILED: {', '.join(failed(results))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
