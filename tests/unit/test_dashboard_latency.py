"""The dashboard's latency card says "faster" only for a speed-up and "slower" (the inverse
ratio) for a slowdown: api/dashboard/js/pages/job.js `latencyNote`, run in Node."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

JOB_JS = Path(__file__).resolve().parents[2] / "api" / "dashboard" / "js" / "pages" / "job.js"

CASES = [
    ((2.0, 1.0), "dense 2 ms · 2× faster"),
    ((1.42, 1.0), "dense 1.42 ms · 1.42× faster"),
    ((0.705, 1.0), "dense 0.705 ms · 1.42× slower"),
    ((1.0, 1.001), "dense 1 ms · as fast"),
    ((1.0, None), "dense 1 ms"),
    # nothing quantized: one artifact measured once, no ratio of it with itself
    ((1.0, 1.0, True), "the dense model.onnx ships as is"),
]


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")
def test_latency_note_says_slower_for_a_slowdown():
    script = (
        f"const {{ latencyNote }} = await import({json.dumps(JOB_JS.as_uri())});\n"
        f"const cases = {json.dumps([list(args) for args, _ in CASES])};\n"
        "console.log(JSON.stringify(cases.map((args) => latencyNote(...args))));\n"
    )
    out = subprocess.run(
        ["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [want for _, want in CASES]
