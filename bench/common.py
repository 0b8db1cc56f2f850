"""Shared helpers for benchmarks: where results go, markdown tables, medians."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

# bench.run_all's quick mode points this at bench/out/quick, so a smoke run never replaces the
# outputs of a full one.
OUT = Path(os.environ.get("BENCH_OUT") or Path(__file__).resolve().parent / "out").resolve()


def out_dir(name: str) -> Path:
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


def machine() -> dict:
    import os

    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


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
