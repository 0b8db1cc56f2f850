"""Which slim shapes onnxruntime runs fast: the registry convnet at 32x32 built with the channel
counts that channel pruning leaves, timed side by side. Not part of the test suite.

    .venv/bin/python -m bench.compression.widths                   # the shapes below
    .venv/bin/python -m bench.compression.widths --widths 32,64,128 16,40,80

bench/compression/channels.py trains and slims real jobs; there, 40% of the channels pruned
(19 and 38 channels left) ran only 1.02-1.30x faster than the dense model where half (16 and 32)
ran 2.5x. This bench asks the runtime alone: random weights (latency does not depend on their
values), the graph the export builds for a model of each shape (`workers.onnx_export.to_onnx`
of the registry `convnet` with `channels: [c1, c2]`, `hidden: h`), one onnxruntime thread, medians
of interleaved runs at batch 1 and 64, beside each shape's multiply-accumulates per sample. A shape
whose speed-up falls well short of its MAC ratio is one the runtime's kernels handle badly.

Each shape is also timed "with offset maps": the same graph with a constant map added after each
conv that follows a pruned one (conv1b, conv2a, conv2b), as slimming added them (`channel_slim.
Offset`) while removed filters kept their biases: a removed channel then output the constant
ReLU(bias), which the next padded conv turns into a map. Since training zeroes those biases with
their filters (`pruning.channel_followers`) a slim convnet has none; the column measures what that
saves. Writes bench/results/compression_widths/{results.json, table.md, widths.png}.
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
from workers.compression.channel_slim import Offset, _insert_after
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
    (16, 48, 96),
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


# the convs that consume a pruned conv's output: where slimming added an offset map
OFFSET_AFTER = ("conv1b", "conv2a", "conv2b")


def with_offset_maps(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """`model` with a fixed random map (one value per output element of a sample) added after
    each conv of OFFSET_AFTER: the graph slimming built when removed channels output constants."""
    shapes: dict[str, torch.Size] = {}
    hooks = [
        model.features.get_submodule(n).register_forward_hook(
            lambda _m, _i, out, n=n: shapes.__setitem__(n, out.shape[1:])
        )
        for n in OFFSET_AFTER
    ]
    with torch.no_grad():
        model(example)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(0)
    for n in OFFSET_AFTER:
        _insert_after(model.features, n, Offset(torch.rand(shapes[n], generator=g) * 0.1))
    return model


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
        for offsets in (False, True):
            model = build_model("convnet", {"channels": [c1, c2], "hidden": h}, info, seed=0).eval()
            if offsets:
                model = with_offset_maps(model, example)
            graph = onnx_export.to_bytes(onnx_export.to_onnx(model, example))
            sessions[((c1, c2, h), offsets)] = onnx_export.session(graph)
    x = np.random.default_rng(0).standard_normal((64, SIDE * SIDE)).astype(np.float32)
    latency = {b: onnx_export.latency_interleaved(sessions, x, b, args.repeats) for b in (1, 64)}
    rows = []
    for w in widths:
        dense = {b: latency[b][(DENSE, False)] for b in latency}
        rows.append(
            {
                "widths": list(w),
                "macs": macs(*w),
                "mac_ratio": macs(*DENSE) / macs(*w),
                "latency_ms": {f"batch{b}": latency[b][(w, False)] for b in latency},
                "speedup": {f"batch{b}": dense[b] / latency[b][(w, False)] for b in latency},
                "offset_maps": {
                    "latency_ms": {f"batch{b}": latency[b][(w, True)] for b in latency},
                    "speedup": {f"batch{b}": dense[b] / latency[b][(w, True)] for b in latency},
                },
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
            "b64 ms, offset maps",
            "b64 speed-up, offset maps",
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
                round(r["offset_maps"]["latency_ms"]["batch64"], 2),
                f"{r['offset_maps']['speedup']['batch64']:.2f}x",
            ]
            for r in rows
        ],
    )
    text = (
        "# Slim convnet shapes in onnxruntime (bench/compression/widths.py)\n\n"
        f"Random weights, one onnxruntime thread, medians of {args.repeats} interleaved runs after 5 "
        f'warm-ups; speed-up against the dense shape {DENSE} without offset maps; "offset maps": '
        f"the same shape with a map added after {', '.join(OFFSET_AFTER)} ({time.time() - t0:.0f} s).\n\n"
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
    for i, r in enumerate(rows):
        ax.scatter(r["mac_ratio"], r["speedup"]["batch64"], color="C0", label="as built" if not i else None)
        ax.scatter(
            r["mac_ratio"],
            r["offset_maps"]["speedup"]["batch64"],
            color="C1",
            marker="x",
            label="with offset maps" if not i else None,
        )
        ax.annotate("/".join(map(str, r["widths"])), (r["mac_ratio"], r["speedup"]["batch64"]), fontsize=7)
    ax.set_xlabel("MACs of the dense shape / MACs of this shape")
    ax.set_ylabel("onnxruntime speed-up at batch 64")
    ax.set_title("convnet shapes: speed-up against MAC ratio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
