"""Which slim shapes onnxruntime runs fast: the registry convnet at 32x32 built with the channel
counts that channel pruning leaves, timed side by side. Not part of the test suite.

    .venv/bin/python -m bench.compression.widths                   # the shapes below
    .venv/bin/python -m bench.compression.widths --widths 32,64,128 16,40,80

bench/compression/channels.py trains and slims real jobs; there, 40% of the channels pruned
(19 and 38 channels left) ran only 1.02-1.30x faster than the dense model where half (16 and 32)
ran 2.5x. This bench asks the runtime alone: random weights (latency does not depend on their
values), the graph the export builds for a model of each shape (`workers.onnx_export.to_onnx`
of the registry `convnet` with `channels: [c1, c2]`, `hidden: h`; a slimmed job's graph may add
the offset maps of folded channels, docs/compression.md), one onnxruntime thread, medians of
interleaved runs at batch 1 and 64, beside each shape's multiply-accumulates per sample. A shape
whose speed-up falls well short of its MAC ratio is one the runtime's kernels handle badly.
Writes bench/results/compression_widths/{results.json, table.md, widths.png}.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from bench.common import conditions, machine, markdown_table, results_dir, save_json
from bench.compression.channels import DATA
from service.spec import parse_spec
from workers import onnx_export
from workers.data import load_dataset
from workers.models import build_model

DENSE = (32, 64, 128)
# dense; r50 (what channel pruning at 50% leaves); r40 plain and rounded to multiples of 8; and
# shapes that keep one block narrow and the other wide.
WIDTHS = [
    DENSE,
    (16, 32, 64),
    (19, 38, 77),
    (24, 40, 80),
    (16, 40, 80),
    (16, 48, 80),
    (24, 32, 80),
    (32, 32, 80),
    (32, 48, 80),
]
SIDE = 32  # the bench's images are 32x32, one channel


def macs(c1: int, c2: int, hidden: int, classes: int = 10) -> int:
    """Multiply-accumulates per sample of the convnet: two 3x3 convs per block (block 1 at 32x32,
    block 2 at 16x16 after a 2x2 pool), then fc1 from the 8x8 map and fc2."""
    hw1, hw2 = SIDE * SIDE, (SIDE // 2) ** 2
    conv = 9 * (hw1 * (1 * c1 + c1 * c1) + hw2 * (c1 * c2 + c2 * c2))
    return conv + c2 * (SIDE // 4) ** 2 * hidden + hidden * classes


def parse_widths(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected c1,c2,hidden (three positive integers), got {text!r}")
    return parts  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", nargs="+", type=parse_widths, default=WIDTHS, help="c1,c2,hidden ...")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args(argv)
    widths = list(dict.fromkeys([DENSE, *args.widths]))  # dense is the reference of every ratio
    t0 = time.time()
    info = load_dataset(parse_spec({"name": "w", "model": {"name": "convnet"}, "data": DATA}).data).info
    example = torch.zeros(2, SIDE * SIDE)
    sessions = {}
    for c1, c2, h in widths:
        model = build_model("convnet", {"channels": [c1, c2], "hidden": h}, info, seed=0).eval()
        sessions[(c1, c2, h)] = onnx_export.session(onnx_export.to_bytes(onnx_export.to_onnx(model, example)))
    x = np.random.default_rng(0).standard_normal((64, SIDE * SIDE)).astype(np.float32)
    latency = {b: onnx_export.latency_interleaved(sessions, x, b, args.repeats) for b in (1, 64)}
    rows = []
    for w in widths:
        rows.append(
            {
                "widths": list(w),
                "macs": macs(*w),
                "mac_ratio": macs(*DENSE) / macs(*w),
                "latency_ms": {f"batch{b}": latency[b][w] for b in latency},
                "speedup": {f"batch{b}": latency[b][DENSE] / latency[b][w] for b in latency},
            }
        )
    m = machine()
    out = results_dir("compression_widths")
    save_json(out / "results.json", {"machine": m, "repeats": args.repeats, "rows": rows})
    table = markdown_table(
        [
            "conv1, conv2 channels, hidden",
            "MACs / sample",
            "dense / this (MACs)",
            "b1 ms",
            "b1 speed-up",
            "b64 ms",
            "b64 speed-up",
        ],
        [
            [
                "{}, {}, {}".format(*r["widths"]),
                f"{r['macs']:,}",
                f"{r['mac_ratio']:.2f}x",
                round(r["latency_ms"]["batch1"], 3),
                f"{r['speedup']['batch1']:.2f}x",
                round(r["latency_ms"]["batch64"], 2),
                f"{r['speedup']['batch64']:.2f}x",
            ]
            for r in rows
        ],
    )
    text = (
        "# Slim convnet shapes in onnxruntime (bench/compression/widths.py)\n\n"
        f"Random weights, one onnxruntime thread, medians of {args.repeats} interleaved runs after 5 "
        f"warm-ups; speed-up against the dense shape {DENSE} ({time.time() - t0:.0f} s).\n\n"
        f"{table}\n\n{conditions(m)}\n"
    )
    (out / "table.md").write_text(text)
    plot(rows, out / "widths.png")
    print(text)


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    top = max(max(r["mac_ratio"], r["speedup"]["batch64"]) for r in rows) * 1.1
    ax.plot([1, top], [1, top], color="grey", lw=0.8, ls="--", label="speed-up = MAC ratio")
    for r in rows:
        ax.scatter(r["mac_ratio"], r["speedup"]["batch64"], color="C0")
        ax.annotate("/".join(map(str, r["widths"])), (r["mac_ratio"], r["speedup"]["batch64"]), fontsize=7)
    ax.set_xlabel("MACs of the dense shape / MACs of this shape")
    ax.set_ylabel("onnxruntime speed-up at batch 64")
    ax.set_title("convnet shapes: speed-up against MAC ratio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
