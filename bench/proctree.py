"""Run a command and follow the CPU time of its whole process tree (the command, its children,
theirs...), so a bench can state the CPU a framework spends per unit of work: unlike wall time,
that does not grow when other processes on a shared machine take the cores."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import psutil


class TreeCpu:
    """Cumulative user+system CPU seconds of a process tree. A process that exits keeps its last
    reading, so the sum never drops when a worker ends."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.last: dict[tuple[int, float], float] = {}  # (pid, start time) -> CPU seconds

    def read(self) -> float:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                with p.oneshot():
                    c = p.cpu_times()
                    self.last[(p.pid, p.create_time())] = c.user + c.system
            except psutil.Error:
                pass  # gone between the listing and the read: its last reading stands
        return sum(self.last.values())


def run_metered(cmd: list[str], log: Path, timeout: float, every: float = 0.25, **popen) -> dict:
    """Run `cmd` to completion (output to `log`), sampling its tree's CPU every `every` s.
    Returns launch and end wall times and the (wall time, CPU seconds) series."""
    launch = time.time()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **popen)
    meter, series = TreeCpu(proc.pid), []
    while proc.poll() is None:
        series.append((time.time(), meter.read()))
        if time.time() - launch > timeout:
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired(cmd, timeout)
        time.sleep(every)
    if proc.returncode != 0:  # the log's tail in the message: a traceback hides an exception's output
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}; its output ends:\n{tail}")
    return {"launch": launch, "end": time.time(), "cpu_series": series}


def cpu_between(series: list[tuple[float, float]], t0: float, t1: float) -> float:
    """CPU seconds the tree used between wall times t0 and t1 (linear between samples)."""
    ts, cs = np.array([s[0] for s in series]), np.array([s[1] for s in series])
    return float(np.interp(t1, ts, cs) - np.interp(t0, ts, cs))
