"""Shared helpers for benchmarks: where results go, the conditions they were measured under,
markdown tables, medians."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each bench's full results (results.json, table.md, a plot) go to bench/results/NAME/, which is
# committed: every figure bench/README.md publishes is read from there.
RESULTS = ROOT / "bench" / "results"
# Scratch (git-ignored): run_all's logs, and everything when BENCH_OUT is set. bench.run_all's
# quick mode points BENCH_OUT at bench/out/quick, so a smoke run never replaces committed results.
SCRATCH = ROOT / "bench" / "out"
OUT = Path(os.environ.get("BENCH_OUT") or SCRATCH).resolve()


# The packages whose versions decide the figures; all are pinned by requirements.lock.
VERSIONED = [
    "torch", "ray", "numpy", "onnx", "onnxruntime", "onnxscript", "scikit-learn", "fastapi",
    "uvicorn", "starlette", "sqlalchemy", "pydantic", "httpx", "sse-starlette", "psycopg",
]  # fmt: skip


def results_dir(name: str) -> Path:
    """Where bench NAME writes its results: bench/results/NAME (committed), or BENCH_OUT/NAME when
    BENCH_OUT is set (quick mode and other scratch runs)."""
    base = Path(os.environ["BENCH_OUT"]).resolve() if os.environ.get("BENCH_OUT") else RESULTS
    d = base / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def out_dir(name: str) -> Path:
    """A scratch folder (git-ignored): logs and intermediate files, never published figures."""
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def _versions() -> dict[str, str | None]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _git() -> dict:
    """The commit the bench ran at, and whether bench/, workers/, service/ or api/ differed from
    it (other engineers' uncommitted work shares this checkout)."""

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    changed = git("status", "--porcelain", "--", "api", "service", "workers", "bench")
    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": None if changed is None else bool(changed),
    }


# The machine is shared: the load when the bench started (this module is imported first thing)
# is as much a condition of its figures as the load at the end. The commit too is the one the
# bench started at: other engineers commit to this checkout while a long bench runs.
_STARTED = (time.time(), os.getloadavg(), _git())


def machine() -> dict:
    """The conditions of a run, for its results.json: when, on what, with which versions, and the
    load average when the bench started and now (this shared machine's load moves the figures)."""
    t0, load0, git = _STARTED
    return {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "versions": _versions(),
        "git": git,
        "load_average": {
            "start": [round(x, 2) for x in load0],
            "end": [round(x, 2) for x in os.getloadavg()],
        },
    }


def conditions(m: dict) -> str:
    """One line for a table.md: the date, machine, load and versions of the run."""
    v = m.get("versions", {})
    shown = ", ".join(
        f"{k} {v[k]}" for k in ("torch", "ray", "onnxruntime", "numpy", "fastapi", "uvicorn") if v.get(k)
    )
    la = m.get("load_average", {})
    start, end = la.get("start", [float("nan")]), la.get("end", [float("nan")])
    return (
        f"Measured {m['started']} -> {m['when']} on {m['cpus']} CPUs ({m.get('cpu_model')}, {m['machine']}), "
        f"load average (1 min) {start[0]:.1f} at the start, {end[0]:.1f} at the end; "
        f"Python {m['python']}, {shown}; commit {str((m.get('git') or {}).get('commit'))[:10]}."
    )


def load_at_end() -> str:
    """The machine's load average as a bench finishes: every table states the conditions its
    figures were measured under, since this machine is shared and noisy."""
    one, five, fifteen = os.getloadavg()
    return f"load average at the end {one:.1f} / {five:.1f} / {fifteen:.1f}"


def save_json(path: Path, obj) -> None:
    # numpy scalars (np.float64 is a float, np.bool_ is not a bool) and arrays, as Python values.
    def plain(o):
        if hasattr(o, "tolist"):
            return o.tolist()
        raise TypeError(f"not JSON: {type(o).__name__}")

    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=plain))
