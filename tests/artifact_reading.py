"""Readers of the shipped artifacts written for the tests, apart from the code under test: they
count zeros straight from the bytes of `model.packed` (its format as workers/pack.py documents
it) and from the ONNX initializers, so a report that counted the wrong tensors cannot agree with
them by construction."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import zstandard
from onnx import numpy_helper


def packed_zeros(data: bytes) -> dict[str, tuple[int, int]]:
    """{tensor name: (zero values, size)} as model.packed stores them: b"SLMTPACK", version 1,
    zstd(u32 header length, JSON header, blobs); a value is zero when its bitmap bit is 0 or its
    stored value (float, or int8 code with zero point 0) is 0."""
    assert data[:8] == b"SLMTPACK" and data[8] == 1, "not a version-1 packed model"
    payload = zstandard.ZstdDecompressor().decompress(data[9:], max_output_size=1 << 31)
    hlen = int.from_bytes(payload[:4], "little")
    header = json.loads(payload[4 : 4 + hlen])
    blobs = payload[4 + hlen :]
    out = {}
    for e in header["tensors"]:
        n = math.prod(e["shape"])

        def blob(key, e=e):
            off, size = e[key]
            return blobs[off : off + size]

        enc = e["encoding"]
        if enc in ("sparse_int8", "dense_int8"):
            values = np.frombuffer(blob("values"), dtype=np.int8)
        elif enc in ("sparse", "dense"):
            values = np.frombuffer(blob("values"), dtype=e["store"])
        else:
            raise AssertionError(f"{e['name']}: encoding {enc} has no reader here")
        if enc.startswith("sparse"):
            bitmap = np.unpackbits(np.frombuffer(blob("bitmap"), dtype=np.uint8))[:n]
            assert int(bitmap.sum()) == len(values), e["name"]
        assert len(values) <= n, e["name"]
        out[e["name"]] = (n - int(np.count_nonzero(values)), n)
    return out


def onnx_weight_zeros(data: bytes) -> dict[str, tuple[int, int]]:
    """{initializer name: (zeros, size)} of the weight input of every Gemm / MatMul / Conv: the
    float initializer itself, or the integer codes its DequantizeLinear reads: a code is zero when
    it equals its zero point (one per tensor: 0 for int8/int4, 128 for uint8-stored weights)."""
    graph = onnx.load_from_string(data).graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    out = {}
    for node in graph.node:
        if node.op_type not in ("Gemm", "MatMul", "Conv") or len(node.input) < 2:
            continue
        name = node.input[1]
        if name not in inits:
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            zp = 0.0
            if len(dq.input) > 2 and dq.input[2]:
                zps = np.unique(numpy_helper.to_array(inits[dq.input[2]]).astype(np.float32))
                assert len(zps) == 1, "weight zero points differ across channels"
                zp = float(zps[0])
            name = dq.input[0]
            arr = np.asarray(numpy_helper.to_array(inits[name])).astype(np.float32) - zp
        else:
            arr = np.asarray(numpy_helper.to_array(inits[name])).astype(np.float32)
        out[name] = (int(np.count_nonzero(arr == 0)), arr.size)
    return out
