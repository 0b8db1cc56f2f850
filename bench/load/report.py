"""Tables, verdicts and plots of a load or soak run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.common import markdown_table, median

# Soak verdict. A bounded process levels off once its caches and pools are warm: its growth
# slows down. A leak grows with the requests served or the jobs seen, i.e. linearly in time
# under a steady load: its slope does not fall. So the slope is judged over the second half of
# the soak (after warm-up), where a filling cache has mostly flattened and a leak has not. 1
# MiB/min is 1.4 GiB a day: the API's Kubernetes pod (deploy/k8s/api.yaml, limit 2 GiB) would be
# OOM-killed within about a day. Over a 4.5-minute half that is ~4.5 MiB of growth, above the
# 1-2 MiB steps that allocator noise makes.
MAX_SLOPE_MIB_PER_MIN = 1.0
WARMUP_S = 60.0  # imports, SQLAlchemy/pydantic caches and thread pools fill in the first minute
WINDOW_S = 60.0  # start and end windows whose medians are compared
MIN_JUDGED_S = 5 * 60.0  # shorter runs report the trend but cannot be judged on it
# The users all connect in the first second or two, as a restarted API's dashboards would: 200
# streams and polls at once. The p99 after this is the one at 200 connected users; the table
# gives both.
CONNECT_S = 10.0


def pct(xs, q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def latency_rows(rec, seconds: float) -> list[list]:
    rows = []
    for route in sorted(rec.lats):
        lat = np.asarray(rec.lats[route]) * 1000
        connected = lat[np.asarray(rec.times[route]) >= CONNECT_S]
        codes = {s: n for (r, s), n in rec.codes.items() if r == route}
        errs = sum(n for (r, _), n in rec.errors.items() if r == route)
        rows.append(
            [
                route,
                len(lat),
                round(len(lat) / seconds, 1),
                ", ".join(f"{s}: {n}" for s, n in sorted(codes.items())),
                sum(n for s, n in codes.items() if s >= 500),
                errs,
                pct(lat, 50),
                pct(lat, 95),
                pct(lat, 99),
                float(lat.max()) if len(lat) else float("nan"),
                pct(connected, 99),
            ]
        )
    return rows


LATENCY_HEADERS = [
    "route",
    "requests",
    "req/s",
    "status codes",
    "5xx",
    "connection errors",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
    f"p99 ms after {CONNECT_S:g} s",
]


def latency_table(rec, seconds: float) -> str:
    return markdown_table(LATENCY_HEADERS, latency_rows(rec, seconds))


def sse_rate(rec, start: float, end: float) -> float:
    """SSE events received per second by all users together, over [start, end)."""
    n = sum(c for s, c in rec.events_per_s.items() if start <= s < end)
    return n / max(end - start, 1e-9)


def soak_verdict(samples: list[dict], t0: float) -> dict:
    """RSS trend after warm-up: the medians of the first and last window, and a least-squares
    slope over every sample after warm-up."""
    ts = np.array([s["t"] - t0 for s in samples])
    rss = np.array([s["rss_mib"] for s in samples])
    span = ts[-1] if len(ts) else 0.0
    warm = min(WARMUP_S, 0.1 * span)
    window = max(min(WINDOW_S, 0.1 * span), 1e-9)
    after = ts >= warm
    first = rss[after & (ts < warm + window)]
    last = rss[ts >= span - window]
    slope = float(np.polyfit(ts[after] / 60, rss[after], 1)[0]) if after.sum() >= 3 else float("nan")
    late = ts >= warm + (span - warm) / 2
    late_slope = float(np.polyfit(ts[late] / 60, rss[late], 1)[0]) if late.sum() >= 3 else float("nan")
    judged = span >= MIN_JUDGED_S
    return {
        "seconds": float(span),
        "samples": len(samples),
        "warmup_s": float(warm),
        "window_s": float(window),
        "rss_start_mib": median(list(first)),
        "rss_end_mib": median(list(last)),
        "rss_min_mib": float(rss.min()) if len(rss) else float("nan"),
        "rss_max_mib": float(rss.max()) if len(rss) else float("nan"),
        "slope_mib_per_min": slope,
        "late_slope_mib_per_min": late_slope,
        "late_from_s": float(warm + (span - warm) / 2),
        "threshold_mib_per_min": MAX_SLOPE_MIB_PER_MIN,
        "judged": bool(judged),
        "ok": bool((not judged) or late_slope <= MAX_SLOPE_MIB_PER_MIN),
        "fds_start_end": [samples[0]["fds"], samples[-1]["fds"]] if samples else None,
        "threads_start_end": [samples[0]["threads"], samples[-1]["threads"]] if samples else None,
    }


def per_minute_p99(rec, route: str, seconds: float) -> tuple[list[float], list[float]]:
    t = np.asarray(rec.times.get(route, []))
    lat = np.asarray(rec.lats.get(route, [])) * 1000
    xs, ys = [], []
    for m in range(int(np.ceil(seconds / 60))):
        sel = (t >= 60 * m) & (t < 60 * (m + 1))
        if sel.sum() >= 20:
            xs.append(m + 0.5)
            ys.append(float(np.percentile(lat[sel], 99)))
    return xs, ys


def windowed_pct(rec, route: str, seconds: float, q: float, width: float = 10.0):
    t = np.asarray(rec.times.get(route, []))
    lat = np.asarray(rec.lats.get(route, [])) * 1000
    xs, ys = [], []
    for k in range(int(np.ceil(seconds / width))):
        sel = (t >= width * k) & (t < width * (k + 1))
        if sel.sum() >= 10:
            xs.append((k + 0.5) * width)
            ys.append(float(np.percentile(lat[sel], q)))
    return np.asarray(xs), np.asarray(ys)


def plot(rec, samples: list[dict], t0: float, verdict: dict | None, seconds: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 3 if verdict else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4))
    ax = axes[0]
    rows = latency_rows(rec, seconds)
    names = [r[0].replace(" (headers)", "\n(headers)") for r in rows]
    x = np.arange(len(rows))
    for i, (q, col) in enumerate(((50, 6), (95, 7), (99, 8))):
        ax.bar(x + (i - 1) * 0.27, [r[col] for r in rows], width=0.27, label=f"p{q}")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    ax.set_title("latency per route", fontsize=9)
    ax.legend(fontsize=8)

    ax = axes[1]
    secs = np.arange(int(seconds))
    ev = np.array([rec.events_per_s.get(int(s), 0) for s in secs])
    k = 10  # a 10 s moving average: single seconds jump with each metrics flush
    smooth = np.convolve(ev, np.ones(k) / k, mode="same") if len(ev) >= k else ev
    ax.plot(secs / 60, smooth, color="#55a868")
    ax.set_xlabel("minutes")
    ax.set_ylabel("SSE events received / s (10 s mean)", color="#55a868")
    ax.set_title("SSE delivery to all users; status latency per 10 s", fontsize=9)
    ax_r = ax.twinx()
    for q, style in ((50, ":"), (99, "-")):
        xs, ys = windowed_pct(rec, "GET /v1/jobs/{id}", seconds, q)
        ax_r.plot(xs / 60, ys, style, color="#c44e52", lw=1, label=f"GET /v1/jobs/{{id}} p{q}")
    ax_r.set_yscale("log")
    ax_r.set_ylabel("ms", color="#c44e52")
    ax_r.legend(fontsize=7, loc="upper right")

    if verdict:
        ax = axes[2]
        ts = np.array([s["t"] - t0 for s in samples]) / 60
        rss = np.array([s["rss_mib"] for s in samples])
        ax.plot(ts, rss, ".-", ms=3, lw=0.8, label="API process RSS")
        after = ts >= verdict["warmup_s"] / 60
        if after.sum() >= 3:
            b, a = np.polyfit(ts[after], rss[after], 1)
            ax.plot(ts[after], a + b * ts[after], "r--", lw=1, label=f"fit after warm-up: {b:+.2f} MiB/min")
        late = ts >= verdict["late_from_s"] / 60
        if late.sum() >= 3:
            b, a = np.polyfit(ts[late], rss[late], 1)
            ax.plot(ts[late], a + b * ts[late], "k-", lw=1.5, label=f"second half (judged): {b:+.2f} MiB/min")
        ax.axvspan(0, verdict["warmup_s"] / 60, color="grey", alpha=0.15, label="warm-up")
        ax.set_xlabel("minutes")
        ax.set_ylabel("MiB")
        ax.set_title(f"soak: RSS (limit {verdict['threshold_mib_per_min']} MiB/min)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
