"""A job's log is for its user: plain text (service.logtext) and slimtrain's own records, with
library chatter routed to a debug log (workers.logs). The lines below are copied from a real
job's log (Ray 2.60, torch 2.13, onnxscript)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from service.logtext import AnsiStripper, strip_ansi
from workers.logs import for_user, forwarded_for_user

RAY_LINE = (
    "\x1b[36m(RayTrainWorker pid=17088)\x1b[0m Setting up process group for: env:// [rank=0, world_size=2]"
)
RAY_BOLD = (
    "Connected to Ray cluster. View the dashboard at \x1b[1m\x1b[32mhttp://127.0.0.1:41589 \x1b[39m\x1b[22m"
)
PREEMPTION = (
    "[2026-12-01 09:04:40,474 E 16642 16855] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: '8a0d4b694421f1509ba6d0d703000000' has constructor arguments in "
    "the object store and max_restarts > 0."
)
TORCH_WARNING = (
    "W1201 09:05:24.191000 16285 .venv/lib/python3.11/site-packages/torch/onnx/_internal/exporter/"
    "_registration.py:107] torchvision is not installed. Skipping torchvision::nms"
)


def test_strip_ansi_removes_colour_and_keeps_the_text():
    assert strip_ansi(RAY_LINE) == (
        "(RayTrainWorker pid=17088) Setting up process group for: env:// [rank=0, world_size=2]"
    )
    assert strip_ansi(RAY_BOLD) == "Connected to Ray cluster. View the dashboard at http://127.0.0.1:41589 "
    assert strip_ansi("\x1b]0;title\x07a\x1b[2Kb\x1bcc\x1b") == "abc"
    plain = "[rank=0] ok [36m is not an escape without ESC"
    assert strip_ansi(plain) is plain


@pytest.mark.parametrize("cut", range(1, len(RAY_LINE)))
def test_a_stream_cut_anywhere_strips_the_same(cut):
    s = AnsiStripper()
    out = s.feed(RAY_LINE[:cut]) + s.feed(RAY_LINE[cut:]) + s.close()
    assert out == strip_ansi(RAY_LINE)


def test_a_stream_of_one_character_chunks():
    s = AnsiStripper()
    text = RAY_BOLD + "\n" + RAY_LINE + "\n"
    assert "".join(s.feed(c) for c in text) + s.close() == strip_ansi(text)
    assert "\x1b" not in strip_ansi(text)


@pytest.mark.parametrize(
    ("name", "level", "expected"),
    [
        ("workers.entrypoint", logging.INFO, True),
        ("service.artifacts", logging.WARNING, True),
        ("workers.export", logging.DEBUG, False),
        ("onnxscript.optimizer._constant_folding", logging.INFO, False),
        ("onnx_ir.passes.common.unused_removal", logging.INFO, False),
        ("torch.onnx._internal.exporter._registration", logging.WARNING, False),
        ("torch.onnx._internal.exporter", logging.ERROR, True),
        ("ray._private.worker", logging.INFO, False),
        ("ray.train", logging.WARNING, False),
        ("ray.train", logging.ERROR, True),
        ("py.warnings", logging.WARNING, False),
        ("urllib3", logging.INFO, False),
        ("urllib3", logging.WARNING, True),
        ("workersfoo", logging.INFO, False),  # a prefix of a name is not the package
    ],
)
def test_which_records_the_user_sees(name, level, expected):
    assert for_user(name, level) is expected


def test_which_forwarded_lines_the_user_sees():
    assert forwarded_for_user("Setting up process group for: env:// [rank=0, world_size=2]", "RayTrainWorker")
    assert forwarded_for_user("Started training worker group of size 2: ", "TrainController")
    assert not forwarded_for_user(PREEMPTION, "TrainController")
    assert not forwarded_for_user(TORCH_WARNING, "RayTrainWorker")
    cleaner = "Exception in thread PlacementGroupCleanerMonitor:"
    assert not forwarded_for_user(cleaner, "PlacementGroupCleaner")
    assert not forwarded_for_user("anything", "PreemptionWatcher")
    # torch's errors and our own workers' records stay
    assert forwarded_for_user(TORCH_WARNING.replace("W1201", "E1201", 1), "RayTrainWorker")
    assert forwarded_for_user("2026-12-01 09:05:24,1 WARNING workers.train_loop: fault injection", None)


SCRIPT = """
import logging, sys, warnings
from pathlib import Path
from workers import logs
logs.setup()
import torch  # installs its own handlers on 'torch' and 'torch.onnx'
logs.setup()
logs.setup().open(Path(sys.argv[1]))
logging.getLogger("workers.entrypoint").info("job j attempt 1: ours")
logging.getLogger("onnxscript.optimizer").info("Skipping constant folding")
logging.getLogger("torch.onnx._internal.exporter._registration").warning("torchvision is not installed")
logging.getLogger("urllib3").warning("a library's warning")
warnings.warn("a library's deprecation", UserWarning)
logs.debug.info("(TrainController pid=1) %s", "core_worker.cc: PreemptionWatcher")
"""


def test_setup_routes_library_chatter_to_the_debug_log(tmp_path):
    """In a process of its own: setup() changes the logging of the whole process."""
    debug = tmp_path / "debug.log"
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(debug)], capture_output=True, text=True, timeout=120, check=True
    )
    user = r.stderr
    assert "ours" in user and "a library's warning" in user
    for noise in ("constant folding", "torchvision", "deprecation", "PreemptionWatcher"):
        assert noise not in user, user
    kept = debug.read_text()
    for line in ("ours", "constant folding", "torchvision", "deprecation", "PreemptionWatcher"):
        assert line in kept, kept
