"""tests/system-deps.sh, which `make test` runs first: installs what is missing, and only that,
through apt-get (sudo when not root), and names the packages when it cannot. Run here against
stand-ins for apt-get, id and sudo on a PATH of their own, so nothing is installed."""

from __future__ import annotations

import glob
import os
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "system-deps.sh"


def _tool(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run(
    tmp_path: Path, *, uid: int, apt: bool, sudo: bool, chromium: str
) -> tuple[subprocess.CompletedProcess, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    _tool(bin_dir, "id", f"echo {uid}")
    if apt:
        _tool(bin_dir, "apt-get", f'echo "apt-get $*" >> {calls}')
    if sudo:
        # sudo -n CMD...: record it, then run CMD (apt-get's stand-in records itself too).
        _tool(bin_dir, "sudo", f'echo "sudo $*" >> {calls}; shift; [ "$1" = true ] || exec "$@"')
    # Only the stand-ins are on PATH: the real apt-get, sudo and pg_ctl cannot be reached.
    env = {"PATH": str(bin_dir), "CHROMIUM": chromium, "HOME": str(tmp_path)}
    proc = subprocess.run(["/bin/bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    return proc, calls.read_text() if calls.exists() else ""


def test_installs_what_is_missing_as_root_without_sudo(tmp_path):
    proc, calls = _run(tmp_path, uid=0, apt=True, sudo=False, chromium="/nonexistent/chromium")
    assert proc.returncode == 0, proc.stderr
    lines = calls.splitlines()
    assert lines[0] == "apt-get update -q"
    assert lines[1].startswith("apt-get install -y -q --no-install-recommends ")
    assert "chromium" in lines[1].split()
    assert not any(x.startswith("sudo") for x in lines)


def test_uses_sudo_when_not_root(tmp_path):
    proc, calls = _run(tmp_path, uid=1000, apt=True, sudo=True, chromium="/nonexistent/chromium")
    assert proc.returncode == 0, proc.stderr
    assert "sudo -n apt-get update -q" in calls
    assert "apt-get install -y -q --no-install-recommends" in calls


@pytest.mark.parametrize(
    ("uid", "apt", "why"),
    [
        (1000, True, "Not root, and sudo is missing or asks for a password."),
        (0, False, "No apt-get on this machine"),
    ],
)
def test_names_the_packages_when_it_cannot_install(tmp_path, uid, apt, why):
    proc, calls = _run(tmp_path, uid=uid, apt=apt, sudo=False, chromium="/nonexistent/chromium")
    assert proc.returncode == 1
    assert "the tests need these system packages:" in proc.stderr
    assert "chromium" in proc.stderr
    assert why in proc.stderr
    assert calls == ""


@pytest.mark.skipif(
    not glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")
    or not os.path.exists("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    reason="PostgreSQL or the font is not installed here",
)
def test_does_nothing_when_all_is_present(tmp_path):
    proc, calls = _run(tmp_path, uid=1000, apt=True, sudo=True, chromium="/bin/sh")
    assert proc.returncode == 0, proc.stderr
    assert calls == ""  # not even apt-get update
    assert proc.stderr == ""
