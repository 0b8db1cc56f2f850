"""The embedded Ray head runs below the API's priority (workers.ray_runtime.lower_head_priority,
settings.ray_nice): its raylet, what the raylet has started, and what it starts later.

The function looks for a child process named `raylet`: the cases that call it run it in a fresh
Python process whose child is a stand-in `raylet` (a shell script), so that the Ray head this
test session may have started in its own process is never touched."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from api.cli import app as cli
from service.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parents[2]

# The stand-in raylet: two children before the priority is lowered, one of them already nicer
# (as Ray starts its workers), and one after (once a line comes on its stdin). It waits with
# shell builtins only, so it has no other child that a listing could catch.
RAYLET = """#!/bin/sh
sleep 60 &
nice -n 15 sleep 62 &
read go
sleep 61 &
: > "$1/started"
wait
"""

PROBE = """
import json, os, subprocess, sys, time
from pathlib import Path
import psutil
from workers.ray_runtime import lower_head_priority

tmp = Path(sys.argv[1])
raylet = subprocess.Popen([str(tmp / "raylet"), str(tmp)], stdin=subprocess.PIPE)
proc = psutil.Process(raylet.pid)
while len(proc.children()) < 2:
    time.sleep(0.02)
looked_at = lower_head_priority(int(sys.argv[2]))
raylet.stdin.write(b"go\\n")
raylet.stdin.flush()
while not (tmp / "started").exists():
    time.sleep(0.02)
time.sleep(0.1)

def nice(p):
    return sorted({os.getpriority(os.PRIO_PROCESS, t.id) for t in p.threads()})

kids = proc.children()
print(json.dumps({
    "looked_at": looked_at,
    "raylet": nice(proc),
    "children": sorted(nice(k) for k in kids),
    "n_children": len(kids),
    "self": nice(psutil.Process()),
}))
for k in kids:
    k.kill()
raylet.kill()
"""


def probe(tmp_path: Path, nice: int) -> dict:
    script = tmp_path / "raylet"
    script.write_text(RAYLET)
    script.chmod(0o755)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROBE), str(tmp_path), str(nice)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_raylet_what_it_started_and_what_it_starts_later_run_at_the_lower_priority(tmp_path):
    seen = probe(tmp_path, 7)
    assert seen["looked_at"] == 3  # the raylet and its first two children
    assert seen["raylet"] == [7]
    assert seen["n_children"] == 3
    # the third was started after the call; the one already at 15 is not raised to 7
    assert seen["children"] == [[7], [7], [15]]
    assert seen["self"] == [0]  # the API keeps its own


def test_nice_zero_changes_nothing(tmp_path):
    seen = probe(tmp_path, 0)
    assert seen["looked_at"] == 0
    assert seen["raylet"] == [0] and seen["children"] == [[0], [0], [15]]


def test_without_a_raylet_child_nothing_is_changed_and_it_says_so():
    code = "from workers.ray_runtime import lower_head_priority as f; print(f(5))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "0"
    assert "no raylet" in out.stderr


@pytest.mark.parametrize("value", [-1, 20])
def test_ray_nice_outside_0_to_19_is_refused_by_name(value):
    with pytest.raises(ValidationError) as e:
        Settings(ray_nice=value)
    assert "ray_nice" in str(e.value)


def test_serve_lowers_the_embedded_heads_priority_to_the_setting(monkeypatch, tmp_path):
    import ray

    import workers.ray_runtime as rr

    calls = []
    monkeypatch.setattr(
        rr, "connect", lambda *a, **kw: calls.append(("connect", kw.get("include_dashboard")))
    )
    monkeypatch.setattr(rr, "lower_head_priority", lambda nice: calls.append(("nice", nice)))

    class Context:
        gcs_address = "127.0.0.1:6379"

    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: calls.append(("run", None)))
    monkeypatch.setattr("api.app.create_app", lambda *a, **kw: object())
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SLIMTRAIN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SLIMTRAIN_API_TOKENS", "nice-token-0123456789abcdef:t")
    monkeypatch.setenv("SLIMTRAIN_RAY_NICE", "4")
    monkeypatch.delenv("SLIMTRAIN_RAY_ADDRESS", raising=False)
    monkeypatch.delenv("SLIMTRAIN_RAY_DASHBOARD_URL", raising=False)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["serve"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert calls == [("connect", True), ("nice", 4), ("run", None)]
