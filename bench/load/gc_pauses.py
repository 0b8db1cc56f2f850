"""Stop-the-world pauses of Python's cyclic garbage collector, as the load bench records them:
in its own process (the load generator: a pause there delays every response it is reading,
and is the generator's, not the server's) and in the served API process (through
`gc_hook/sitecustomize.py`, which Python imports at start-up when its folder is on PYTHONPATH).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

MIN_PAUSE_S = 0.005  # shorter ones are noise beside a 2-CPU machine's scheduling
ENV = "BENCH_GC_PAUSES"  # the file the served process appends its pauses to
HOOK_DIR = Path(__file__).parent / "gc_hook"

Pause = tuple[float, int, float]  # (time.time() at the end, generation, seconds)


def install(sink: Callable[[Pause], None]) -> None:
    """Report each collection of this process that takes MIN_PAUSE_S or more to `sink`."""
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        if took >= MIN_PAUSE_S:
            sink((time.time(), info["generation"], took))

    gc.callbacks.append(on_gc)


def read(path: Path) -> list[Pause]:
    """The pauses the served process wrote (one `time generation seconds` line each)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        t, gen, took = line.split()
        out.append((float(t), int(gen), float(took)))
    return out


def summary(pauses: list[Pause], t0_wall: float) -> dict:
    """Count, longest and total of the pauses from `t0_wall` on (start-up's are not under load),
    and the five longest (seconds into the run)."""
    pauses = [p for p in pauses if p[0] >= t0_wall]
    longest = sorted(pauses, key=lambda p: -p[2])[:5]
    return {
        "count": len(pauses),
        "max_ms": round(max((p[2] for p in pauses), default=0.0) * 1000, 1),
        "total_ms": round(sum(p[2] for p in pauses) * 1000, 1),
        "full_collections": sum(1 for p in pauses if p[1] == 2),
        "longest": [[round(t - t0_wall, 2), gen, round(took * 1000, 1)] for t, gen, took in longest],
    }
