"""The packed compressed model: the file whose size is `size.compressed_bytes`.

Layout: b"SLMTPACK" + u8 version + zstd( u32 header length + header JSON + tensor blobs ).
The header names the registry model, its arguments and the DataInfo, so `load_packed` rebuilds
the module without any other file. Each tensor is stored with one encoding:

- `dense`: raw little-endian values in the tensor's dtype;
- `sparse`: a bitmap of nonzero positions (1 bit per weight) + the nonzero values;
- `sparse_int8` / `dense_int8` (quantized weights, 8 or 4 bits): integer codes in int8 bytes +
  per-output-channel scales (stored as float16 when that is exact, which the quantizer arranges);
  the rebuilt weight is code * scale, exactly what the quantized ONNX graph computes;
- `sparse_codebook`: the nonzero values are indices into a small k-means codebook (weight
  sharing, Deep Compression's second stage), stored at the fewest bits that hold them;
- `shared` (`compression.weight_sharing`): the layer's distinct values + zstd-coded position
  gaps and one-byte codes (workers.compression.weight_sharing.encode).

The whole payload is zstd-compressed (the entropy-coding stage): its Huffman-coded literals give
4-bit and shared (codebook) codes their few bits each without a bit-packing format of our own.
Rebuilding is exact: the loader returns the same values bit for bit (pruned entries come back as
+0.0).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
import torch
import zstandard
from torch import nn

from service.errors import CheckpointError

MAGIC = b"SLMTPACK"
VERSION = 1
SPARSE_BELOW = 0.97  # density under which a bitmap + values beats the dense array


@dataclass
class QuantizedWeight:
    """Per-output-channel symmetric integer weights: w = codes * scale[channel]."""

    codes: torch.Tensor  # int8 storage, weight's shape, within [-(2**(bits-1) - 1), 2**(bits-1) - 1]
    scale: torch.Tensor  # float32, [out_channels]
    bits: int = 8
    axis: int = 0  # the output-channel axis of `codes` (1 for transformers' Conv1D, stored (in, out))


def _np_dtype(t: torch.Tensor) -> np.dtype:
    return {
        torch.float32: np.float32,
        torch.float16: np.float16,
        torch.int64: np.int64,
        torch.int32: np.int32,
        torch.int8: np.int8,
        torch.uint8: np.uint8,
        torch.bool: np.bool_,
    }[t.dtype]


def _narrow(arr: np.ndarray) -> np.ndarray:
    """float32 values that float16 holds exactly are stored as float16: half the bytes, the same
    values (the quantizer puts scales on that grid; export puts a quantized model's float parts
    there too)."""
    if arr.dtype != np.float32:
        return arr
    with np.errstate(over="ignore"):  # beyond float16's range: inf, unequal, kept float32
        half = arr.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), arr) else arr


def _bitpack(values: np.ndarray, bits: int) -> bytes:
    """Pack small unsigned ints at `bits` bits each (big-endian bit order)."""
    as_bits = ((values[:, None] >> np.arange(bits - 1, -1, -1)) & 1).astype(np.uint8)
    return np.packbits(as_bits.ravel()).tobytes()


def _bitunpack(data: bytes, bits: int, n: int) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: n * bits].reshape(n, bits)
    return (flat.astype(np.int64) << np.arange(bits - 1, -1, -1)).sum(axis=1)


class _Writer:
    def __init__(self):
        self.blobs: list[bytes] = []
        self.offset = 0

    def add(self, data: bytes) -> list[int]:
        span = [self.offset, len(data)]
        self.blobs.append(data)
        self.offset += len(data)
        return span


def pack(
    state: dict[str, torch.Tensor],
    meta: dict,
    quantized: dict[str, QuantizedWeight] | None = None,
    codebooks: dict[str, int] | None = None,
    level: int = 19,
    shared: set[str] | None = None,
) -> bytes:
    """Serialise a state dict. `quantized` replaces named float weights by their int8 form;
    `codebooks` maps weight names to a k-means cluster count for weight sharing; `shared` names
    weights that already hold few distinct values (fine-tuned weight sharing), stored exactly."""
    quantized = quantized or {}
    codebooks = codebooks or {}
    shared = shared or set()
    w = _Writer()
    entries = []
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        e: dict = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        if name in quantized:
            q = quantized[name]
            codes = q.codes.cpu().numpy().astype(np.int8)
            nz = codes != 0
            scale = _narrow(q.scale.float().cpu().numpy())
            e["bits"], e["scale_dtype"] = q.bits, str(scale.dtype)
            if q.axis:
                e["axis"] = q.axis
            e["scale"] = w.add(scale.tobytes())
            if nz.mean() < SPARSE_BELOW:
                e["encoding"] = "sparse_int8"
                e["bitmap"] = w.add(np.packbits(nz.ravel()).tobytes())
                e["values"] = w.add(codes[nz].tobytes())
            else:
                e["encoding"] = "dense_int8"
                e["values"] = w.add(codes.tobytes())
        elif name in shared:
            from workers.compression.weight_sharing import encode

            e["encoding"] = "shared"
            e.update({k: w.add(v) for k, v in encode(t).items()})
        elif t.is_floating_point() and t.dim() >= 2 and name in codebooks:
            arr = t.float().numpy()
            nz = arr != 0
            centroids, idx = kmeans_1d(arr[nz], codebooks[name])
            bits = max(1, int(np.ceil(np.log2(max(2, len(centroids))))))
            e.update(encoding="sparse_codebook", bits=bits, n=int(nz.sum()))
            e["bitmap"] = w.add(np.packbits(nz.ravel()).tobytes())
            e["codebook"] = w.add(centroids.astype(np.float32).tobytes())
            e["values"] = w.add(_bitpack(idx, bits))
        elif t.is_floating_point() and t.dim() >= 2 and (t != 0).float().mean() < SPARSE_BELOW:
            arr = t.numpy()
            nz = arr != 0
            values = _narrow(arr[nz])
            e["encoding"], e["store"] = "sparse", str(values.dtype)
            e["bitmap"] = w.add(np.packbits(nz.ravel()).tobytes())
            e["values"] = w.add(values.tobytes())
        else:
            values = _narrow(t.numpy())
            e["encoding"], e["store"] = "dense", str(values.dtype)
            e["values"] = w.add(values.tobytes())
        entries.append(e)
    header = json.dumps({"meta": meta, "tensors": entries}, sort_keys=True).encode()
    payload = struct.pack("<I", len(header)) + header + b"".join(w.blobs)
    return MAGIC + bytes([VERSION]) + zstandard.ZstdCompressor(level=level).compress(payload)


def unpack(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, meta) from a packed file; raises CheckpointError on anything malformed."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 1 or data[len(MAGIC)] != VERSION:
        raise CheckpointError("not a slimtrain packed model (bad magic or version)")
    try:
        payload = zstandard.ZstdDecompressor().decompress(data[len(MAGIC) + 1 :], max_output_size=1 << 34)
        (hlen,) = struct.unpack_from("<I", payload)
        header = json.loads(payload[4 : 4 + hlen])
        blobs = memoryview(payload)[4 + hlen :]
        state = {e["name"]: _decode(e, blobs) for e in header["tensors"]}
    except (zstandard.ZstdError, ValueError, KeyError, struct.error) as e:
        raise CheckpointError(f"packed model is corrupt: {e}") from None
    return state, header["meta"]


def _decode(e: dict, blobs: memoryview) -> torch.Tensor:
    def blob(key):
        off, n = e[key]
        return bytes(blobs[off : off + n])

    shape = tuple(e["shape"])
    n = int(np.prod(shape)) if shape else 1
    dtype = getattr(torch, e["dtype"])
    enc = e["encoding"]
    if enc == "shared":
        from workers.compression.weight_sharing import decode

        return decode({k: blob(k) for k in ("codebook", "gaps", "codes")}, shape, dtype)
    if enc == "dense":
        np_dt = _np_dtype(torch.empty(0, dtype=dtype))
        stored = np.frombuffer(blob("values"), dtype=e.get("store", np_dt))
        return torch.from_numpy(stored.astype(np_dt).reshape(shape))
    if enc in ("sparse", "sparse_int8", "sparse_codebook"):
        nz = np.unpackbits(np.frombuffer(blob("bitmap"), dtype=np.uint8))[:n].astype(bool)
    if enc == "sparse":
        out = np.zeros(n, dtype=_np_dtype(torch.empty(0, dtype=dtype)))
        out[nz] = np.frombuffer(blob("values"), dtype=e.get("store", "float32"))
        return torch.from_numpy(out.reshape(shape))
    if enc == "sparse_codebook":
        codebook = np.frombuffer(blob("codebook"), dtype=np.float32)
        out = np.zeros(n, dtype=np.float32)
        out[nz] = codebook[_bitunpack(blob("values"), e["bits"], e["n"])]
        return torch.from_numpy(out.reshape(shape)).to(dtype)
    if enc in ("sparse_int8", "dense_int8"):
        scale = np.frombuffer(blob("scale"), dtype=e.get("scale_dtype", "float32")).astype(np.float32)
        codes = np.zeros(n, dtype=np.int8)
        if enc == "sparse_int8":
            codes[nz] = np.frombuffer(blob("values"), dtype=np.int8)
        else:
            codes[:] = np.frombuffer(blob("values"), dtype=np.int8)
        codes = codes.reshape(shape)
        per_channel = [1] * len(shape)
        per_channel[e.get("axis", 0)] = -1
        w = codes.astype(np.float32) * scale.reshape(per_channel)
        return torch.from_numpy(w).to(dtype)
    raise ValueError(f"unknown encoding {enc!r}")


def kmeans_1d(values: np.ndarray, k: int, iters: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars with linear initialisation over [min, max] (the initialisation
    Han et al. found best for weight sharing: it keeps the rare large weights represented).
    Returns (centroids, index of each value)."""
    if values.size == 0:
        return np.zeros(1, dtype=np.float32), np.zeros(0, dtype=np.int64)
    k = max(1, min(k, np.unique(values).size))
    centroids = np.linspace(values.min(), values.max(), k).astype(np.float64)
    order = np.argsort(values)
    sorted_vals = values[order].astype(np.float64)
    for _ in range(iters):
        bounds = (centroids[1:] + centroids[:-1]) / 2
        idx_sorted = np.searchsorted(bounds, sorted_vals)
        sums = np.bincount(idx_sorted, weights=sorted_vals, minlength=k)
        counts = np.bincount(idx_sorted, minlength=k)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        if np.allclose(new, centroids):
            break
        centroids = np.sort(new)
    bounds = (centroids[1:] + centroids[:-1]) / 2
    idx = np.searchsorted(bounds, values.astype(np.float64))
    return centroids.astype(np.float32), idx.astype(np.int64)


def rebuild(data: bytes) -> nn.Module:
    """The model a packed file describes, with its weights: ready to run."""
    from workers.data.info import DataInfo
    from workers.models import build_model

    state, meta = unpack(data)
    info = DataInfo.from_dict(meta["data_info"])
    model = build_model(meta["model"]["name"], meta["model"]["args"], info)
    from workers.compression import registry

    registry.conform(model, state)  # e.g. a channel-pruned model's smaller layers
    model.load_state_dict(state)
    return model.eval()
