"""`slimtrain report` renders the compression report's keys as a table; --json gives them back."""

import json

from typer.testing import CliRunner

from api.cli import app

REPORT = {
    "job_id": "j1",
    "name": "digits-qat",
    "model": "lenet5",
    "data": "digits",
    "strategy": "ddp",
    "workers": 2,
    "precision": "fp32",
    "accuracy": 0.9611,
    "accuracy_source": "model.int8.onnx run in onnxruntime on the validation split",
    "float_accuracy": 0.9639,
    "dense_accuracy": 0.9722,
    "sparsity": {"global": 0.9, "layers": {"fc1": 0.91}},
    "params": {"total": 21000, "nonzero": 2100},
    "size": {
        "dense_bytes": 85544,
        "compressed_bytes": 4277,
        "ratio": 20.0,
        "onnx_bytes": 106385,
        "onnx_quantized_bytes": 49681,
    },
    "latency_ms": {"dense": 0.01, "compressed": 0.02, "dense_batch64": 0.2, "compressed_batch64": 0.1},
    "latency_setup": {"runtime": "onnxruntime 1.32.0 CPU", "statistic": "median of 50 runs"},
    "quantization": {
        "mode": "qat",
        "bits": 8,
        "activations": "uint8 per-tensor affine",
        "onnx": "model.int8.onnx",
    },
    "warnings": ["accuracy 0.9611 of the exported artifact is 1.10 points below something"],
    "steps": 660,
}


def test_report_table_shows_the_compression_keys(tmp_path, cli_width):
    (tmp_path / "report.json").write_text(json.dumps(REPORT))
    cli_width(250)
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 0, r.output
    out = r.stdout
    for text in (
        "96.11%",  # the artifact's accuracy
        "model.int8.onnx run in onnxruntime",
        "96.39%",
        "-1.11 points",  # vs dense
        "qat, int8 weights, activations uint8 per-tensor affine",
        "20.0x",
        "4,277 B",
        "size model.int8.onnx",
        "dense 0.0100 / compressed 0.0200 (0.50x)",
        "latency batch 64 (ms)",
        "(2.00x)",
        "1.10 points below",
    ):
        assert text in out, text
    r = CliRunner().invoke(app, ["report", str(tmp_path), "--json"])
    assert json.loads(r.stdout) == REPORT


def test_report_of_a_missing_job_folder_exits_2(tmp_path):
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "report.json does" in " ".join(r.output.split())
