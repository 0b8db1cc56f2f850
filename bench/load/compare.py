"""Side by side: several `bench.load` runs of different code, run one after the other.

    .venv/bin/python -m bench.load.compare --out bench/results/load_ab \
        --describe base="git archive 4db5e3b" ... DIR [DIR ...]

Each DIR holds one run's results.json (as `BENCH_OUT=DIR python -m bench.load` writes it, under
DIR/load/ or in DIR itself); its name is the run's label, and the label without a trailing `-N`
is its variant, so `base-1` and `base-2` are two runs of `base`. Writes table.md (one column per
run, then each variant's median and its ratio to the first variant's) and load.png to --out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.common import conditions, markdown_table, median

STATUS = "GET /v1/jobs/{id}"
# (row label, function of a results.json)
ROWS = [
    ("GET job p50 ms", lambda r: _route(r, STATUS)[6]),
    ("GET job p95 ms", lambda r: _route(r, STATUS)[7]),
    ("GET job p99 ms", lambda r: _route(r, STATUS)[8]),
    ("GET job max ms", lambda r: _route(r, STATUS)[9]),
    ("GET job p99 ms after the connect (t >= 10 s)", lambda r: _route(r, STATUS)[10]),
    ("GET job p99 ms, minute 1", lambda r: r["per_minute_p99_ms"][STATUS][1][0]),
    ("GET job p99 ms, minute 2", lambda r: r["per_minute_p99_ms"][STATUS][1][-1]),
    ("GET job req/s", lambda r: _route(r, STATUS)[2]),
    ("job list p99 ms", lambda r: _route(r, "GET /v1/jobs")[8]),
    ("metrics page p99 ms", lambda r: _route(r, "GET /v1/jobs/{id}/metrics")[8]),
    ("SSE headers p99 ms", lambda r: _route(r, "GET /v1/jobs/{id}/events (headers)")[8]),
    ("SSE delivery lag p50 s", lambda r: r["sse_delivery_lag_s"]["50"]),
    ("SSE delivery lag p99 s", lambda r: r["sse_delivery_lag_s"]["99"]),
    ("API GC pauses >= 5 ms", lambda r: r["gc_pauses"]["api"]["count"]),
    ("API longest GC pause ms", lambda r: r["gc_pauses"]["api"]["max_ms"]),
    ("load generator longest GC pause ms", lambda r: r["gc_pauses"]["generator"]["max_ms"]),
    ("API CPU median % of a core", lambda r: median([s["cpu_percent"] for s in r["samples"][1:]])),
    ("requests (all routes)", lambda r: sum(row[1] for row in r["latency"])),
    ("5xx + connection errors", lambda r: sum(row[4] + row[5] for row in r["latency"])),
]


def _route(res: dict, route: str) -> list:
    return next(row for row in res["latency"] if row[0] == route)


def load(d: Path) -> dict:
    for p in (d / "load" / "results.json", d / "results.json"):
        if p.exists():
            return json.loads(p.read_text())
    raise SystemExit(f"{d}: no results.json (in it or in its load/)")


def variant(label: str) -> str:
    return re.sub(r"-\d+$", "", label)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--describe", nargs="*", default=[], help="VARIANT=what its code was")
    args = ap.parse_args()
    runs = {d.name: load(d) for d in args.dirs}
    variants = list(dict.fromkeys(variant(lb) for lb in runs))
    described = dict(x.split("=", 1) for x in args.describe)

    headers = ["", *runs, *(f"{v} median" for v in variants), *(f"{v} / {variants[0]}" for v in variants[1:])]
    rows = []
    for name, fn in ROWS:
        per_run = {lb: float(fn(r)) for lb, r in runs.items()}
        meds = {v: median([x for lb, x in per_run.items() if variant(lb) == v]) for v in variants}
        ratios = [meds[v] / meds[variants[0]] if meds[variants[0]] else float("nan") for v in variants[1:]]
        rows.append([name, *per_run.values(), *meds.values(), *ratios])

    lines = [
        "# bench.load, side by side",
        "",
        "`python -m bench.load.compare` over runs of `python -m bench.load` (200 users, 120 s each), run one "
        "after the other in the order of the columns. Medians over each variant's runs; ratios of medians.",
        "",
        markdown_table(headers, rows),
        "",
    ]
    for v in variants:
        lines.append(f"- **{v}**: {described.get(v, '(not described)')}")
    lines.append("")
    for lb, r in runs.items():
        lines.append(f"- {lb}: {conditions(r['machine'])}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(9, 4))
    pcts = ["GET job p50 ms", "GET job p95 ms", "GET job p99 ms"]
    width = 0.8 / len(runs)
    for i, (lb, r) in enumerate(runs.items()):
        vals = [float(dict(ROWS)[p](r)) for p in pcts]
        ax.bar([j + i * width for j in range(len(pcts))], vals, width, label=lb)
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(pcts))], ["p50", "p95", "p99"])
    ax.set_yscale("log")
    ax.set_ylabel("GET /v1/jobs/{id} latency (ms)")
    ax.set_title("200 users while jobs train, per run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "load.png", dpi=100)
    print(f"wrote {args.out / 'table.md'}, load.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
