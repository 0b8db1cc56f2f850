"""Imported by Python at start-up in the load bench's served process (bench/load/server.py puts
this folder on its PYTHONPATH): appends the process's garbage-collector pauses to the file named
by BENCH_GC_PAUSES. The variable is removed here, so the Ray processes the server starts do not
record theirs."""

import os

_path = os.environ.pop("BENCH_GC_PAUSES", None)
if _path:
    from bench.load import gc_pauses

    _out = open(_path, "a", buffering=1)  # noqa: SIM115 - open for the life of the process
    gc_pauses.install(lambda p: _out.write(f"{p[0]:.4f} {p[1]} {p[2]:.5f}\n"))
