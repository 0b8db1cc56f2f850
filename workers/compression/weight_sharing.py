"""Weight sharing fine-tuned after clustering (Deep Compression's second stage, Han et al. 2016)
for `compression.weight_sharing`, and the entropy-coded form its weights ship in.

At `start_step` (at or after pruning's last mask update) the surviving (nonzero) weights of each
Linear/Conv layer are clustered by k-means (linear initialisation over [min, max], the one Han
et al. found best: it keeps the rare large weights represented) into at most 2**bits centroids,
and every weight takes its centroid's value. From then on the layer holds only those values:

- after backward, each member's gradient becomes the *sum* of its cluster's gradients (the
  centroid's gradient in the paper), so the job's own optimizer (SGD or AdamW, its learning-rate
  schedule, weight decay) moves every member of a cluster by the same amount. Members start
  with equal values and, at clustering, equal optimizer state (each cluster's mean): elementwise
  updates keep them equal;
- after every optimizer step (also one the fp16 scaler skipped) the layer is written back from
  one representative member per cluster, so they are equal bit for bit whatever the arithmetic;
  pruned weights stay exactly 0. The other float parameters (biases) are kept on the float16
  grid, which is how the packed file stores them.

State for exact resume: each layer's assignment (int16, -1 where pruned) — the centroids are the
weights themselves, checkpointed with the model. FSDP and pipeline stages hold parts of layers
(a cluster spans the whole layer), so the spec allows `ddp` only, where every rank holds the
same whole weights and clusters them identically.

The packed encoding (`encode` / `decode`, used by workers.pack as `shared`): the codebook (the
layer's distinct nonzero values, float32), the positions of the nonzero weights as gaps between
them (one byte each; a gap of 255 or more is written as 255 bytes that emit no weight, as in
Deep Compression's relative indexing), and one code byte per nonzero weight. The gap and code
streams are each entropy-coded by zstd (its Huffman-coded literals give each symbol about its
information content in bits, which is what Deep Compression's Huffman stage does; measured on
the digits mlp it came within 10-15% of the order-0 entropy). Decoding gives the weight back bit
for bit.
"""

from __future__ import annotations

import logging
import zlib
from collections import OrderedDict

import numpy as np
import torch
import zstandard
from torch import nn

from service.spec import JobSpec, WeightSharingSpec
from workers.compression.protocol import BaseMethod, Context
from workers.compression.pruning import prunable_weights, verify_masks_agree
from workers.pack import kmeans_1d

log = logging.getLogger(__name__)

ESCAPE = 255  # a gap byte that skips 255 positions without a weight
ZSTD_LEVEL = 19
MAX_CODEBOOK = 256  # codes are one byte


# --- clustering (pure) --------------------------------------------------------------------------


def cluster(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids float32 [k], assignment int16 of w's shape: -1 where w == 0) for one layer.

    k <= 2**bits (fewer when the layer holds fewer distinct nonzero values). A centroid that
    came out exactly 0.0 would make its members look pruned; none of k-means' means of nonzero
    values is 0 in practice, and the encoding stays exact either way."""
    flat = w.detach().float().cpu().reshape(-1).numpy()
    nz = flat != 0
    assign = np.full(flat.shape, -1, dtype=np.int16)
    if not nz.any():
        return torch.zeros(0), torch.from_numpy(assign.reshape(tuple(w.shape)))
    centroids, idx = kmeans_1d(flat[nz], 2**bits)
    assign[nz] = idx
    return torch.from_numpy(centroids), torch.from_numpy(assign.reshape(tuple(w.shape)))


def shared_values(centroids: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """The weight a layer holds after sharing: centroid[assignment], 0 where pruned."""
    out = torch.zeros(assign.shape, dtype=torch.float32)
    members = assign >= 0
    out[members] = centroids.float()[assign[members].long()]
    return out


def cluster_sums(values: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of `values` over each cluster's members ([k]); pruned positions count nowhere."""
    members = assign >= 0
    out = torch.zeros(k, dtype=values.dtype, device=values.device)
    return out.index_add_(0, assign[members].long(), values[members])


def representatives(assign: torch.Tensor, k: int) -> torch.Tensor:
    """The flat index of each cluster's first member ([k], int64): the value the cluster holds."""
    flat = assign.reshape(-1).long()
    pos = torch.arange(flat.numel(), device=flat.device)
    first = torch.full((k,), flat.numel(), dtype=torch.long, device=flat.device)
    members = flat >= 0
    first.scatter_reduce_(0, flat[members], pos[members], reduce="amin")
    return first.clamp_max_(max(flat.numel() - 1, 0))  # an empty cluster: any index, never read


# --- the shared layers during training ----------------------------------------------------------


class SharedLayers:
    """The clustered layers of one model: assignments, and the hooks that keep them shared."""

    def __init__(self, weights: OrderedDict[str, torch.Tensor], rest: list[torch.Tensor]):
        self.weights = weights
        self.rest = rest  # other float parameters (biases): kept on the float16 grid
        self.assign: dict[str, torch.Tensor] = {}  # on the weights' device
        self.k: dict[str, int] = {}

    @property
    def clustered(self) -> bool:
        return bool(self.assign)

    @torch.no_grad()
    def cluster_(self, bits: int, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
        for name, w in self.weights.items():
            centroids, assign = cluster(w, bits)
            self.assign[name] = assign.to(w.device)
            self.k[name] = len(centroids)
            w.copy_(shared_values(centroids, assign).to(w.device, w.dtype))
            if optimizer is not None:
                self._share_optimizer_state(optimizer, name, w)
        self.snap_()
        return dict(self.k)

    def _share_optimizer_state(self, optimizer: torch.optim.Optimizer, name: str, w: torch.Tensor) -> None:
        """Each cluster's members get the cluster's mean running state (momentum, Adam moments):
        with equal values, gradients and state they stay equal under any elementwise optimizer."""
        assign, k = self.assign[name], self.k[name]
        members = assign >= 0
        counts = cluster_sums(torch.ones_like(w, dtype=torch.float32), assign, k).clamp_min(1)
        for value in optimizer.state.get(w, {}).values():
            if torch.is_tensor(value) and value.shape == w.shape and value.is_floating_point():
                mean = cluster_sums(value.float(), assign, k) / counts
                shared = torch.zeros_like(value)
                shared[members] = mean[assign[members].long()].to(value.dtype)
                value.copy_(shared)

    @torch.no_grad()
    def share_grads_(self) -> None:
        """Every member's gradient := the sum over its cluster (the centroid's gradient)."""
        for name, w in self.weights.items():
            if w.grad is None:
                continue
            assign = self.assign[name]
            members = assign >= 0
            sums = cluster_sums(w.grad.float(), assign, self.k[name])
            g = torch.zeros_like(w.grad)
            g[members] = sums[assign[members].long()].to(g.dtype)
            w.grad.copy_(g)

    @torch.no_grad()
    def snap_(self) -> None:
        """Write each layer back from its clusters' representatives; biases onto float16."""
        for name, w in self.weights.items():
            assign = self.assign[name]
            members = assign >= 0
            held = w.reshape(-1)[representatives(assign, self.k[name])]
            out = torch.zeros_like(w)
            out[members] = held[assign[members].long()]
            w.copy_(out)
        for p in self.rest:
            half = p.half().to(p.dtype)
            p.copy_(torch.where(torch.isfinite(half), half, p))  # beyond float16's range: as is

    def checksum(self) -> int:
        """CRC32 of the assignments and shared values, in layer order: equal on every rank that
        clustered equal weights equally."""
        crc = 0
        for name, a in self.assign.items():
            crc = zlib.crc32(name.encode(), crc)
            crc = zlib.crc32(a.cpu().numpy().tobytes(), crc)
            crc = zlib.crc32(self.weights[name].detach().float().cpu().numpy().tobytes(), crc)
        return crc

    def state_dict(self) -> dict:
        return {"assign": {n: a.cpu().clone() for n, a in self.assign.items()}, "k": dict(self.k)}

    def load_state_dict(self, state: dict) -> None:
        self.assign = {n: a.to(self.weights[n].device) for n, a in state["assign"].items()}
        self.k = dict(state["k"])


# --- the method (workers.compression.protocol) --------------------------------------------------


class WeightSharingMethod(BaseMethod):
    """`compression.weight_sharing`: cluster at `start_step` (or after the last step when the
    run is shorter), then fine-tune the shared values to the end."""

    name = "weight_sharing"
    state_key = "weight_sharing"

    def __init__(self, cfg: WeightSharingSpec):
        self.cfg = cfg
        self.layers: SharedLayers | None = None
        self.ctx: Context | None = None

    @classmethod
    def from_spec(cls, spec: JobSpec) -> WeightSharingMethod | None:
        ws = spec.compression.weight_sharing
        return None if ws is None else cls(ws)

    def attach(self, ctx: Context) -> None:
        module = ctx.module
        weights = prunable_weights(module)
        held = {id(w) for w in weights.values()}
        rest = [p for p in module.parameters() if p.is_floating_point() and id(p) not in held]
        self.layers = SharedLayers(weights, rest)
        self.ctx = ctx

    def start_at(self) -> int:
        """The clustering step: start_step, or the final schedule call of a shorter run."""
        return min(self.cfg.start_step, self.ctx.total_steps)

    def on_step(self, step: int, optimizer: torch.optim.Optimizer) -> dict | None:
        if self.layers.clustered or step < self.start_at():
            return None
        k = self.layers.cluster_(self.cfg.bits, optimizer)
        # Under DDP every replica clusters its own copy: they must agree, or they diverge.
        checksums = self.ctx.dist.all_gather_object(self.layers.checksum())
        verify_masks_agree(checksums)
        log.info("weight sharing at step %d: %s clusters per layer", step, k)
        return {"event": "weight_sharing", "step": step, "clusters": k, "mask_checksums": checksums}

    def after_backward(self) -> None:
        if self.layers.clustered:
            self.layers.share_grads_()

    def after_optimizer_step(self) -> None:
        if self.layers.clustered:
            self.layers.snap_()

    def start_part(self) -> dict:
        return {"weight_sharing": {"bits": self.cfg.bits, "start_step": self.start_at()}}

    def state_dict(self) -> dict:
        return self.layers.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            from service.errors import ConfigError

            raise ConfigError("checkpoint has no weight-sharing state but the spec shares weights")
        self.layers.load_state_dict(state)

    @classmethod
    def report_part(cls, spec: JobSpec, model: nn.Module) -> dict[str, dict]:
        ws = spec.compression.weight_sharing
        if ws is None:
            return {}
        layers = {}
        for name, w in prunable_weights(model).items():
            flat = w.detach().reshape(-1)
            layers[name] = int(torch.unique(flat[flat != 0]).numel())
        return {
            "weight_sharing": {
                "bits": ws.bits,
                "start_step": ws.start_step,
                # Counted on the decoded model.packed: distinct nonzero values per layer.
                "clusters": layers,
                "measured_on": "model.packed",
                "encoding": "codebook + zstd-coded position gaps and codes (workers.pack `shared`)",
            }
        }


def shared_layers(spec: JobSpec, state: dict[str, torch.Tensor]) -> set[str]:
    """The state-dict keys export packs with the `shared` encoding: the layers' weights that hold
    at most 256 distinct values (the clustered ones; an embedding matrix is no Linear/Conv)."""
    if spec.compression.weight_sharing is None:
        return set()
    return {k for k, v in state.items() if k.endswith(".weight") and v.dim() >= 2 and encodable(v)}


# --- the packed encoding (pure) -----------------------------------------------------------------


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)


def gap_tokens(positions: np.ndarray) -> np.ndarray:
    """Gap bytes of sorted flat positions: gap g (zeros skipped) is ESCAPE * (g // ESCAPE)
    followed by g % ESCAPE."""
    gaps = np.diff(positions, prepend=-1) - 1
    escapes = gaps // ESCAPE
    out = np.full(len(gaps) + int(escapes.sum()), ESCAPE, dtype=np.uint8)
    # Each weight's own token comes after its escapes.
    ends = np.cumsum(escapes + 1) - 1
    out[ends] = (gaps % ESCAPE).astype(np.uint8)
    return out


def positions_of(tokens: np.ndarray) -> np.ndarray:
    """Inverse of gap_tokens."""
    t = tokens.astype(np.int64)
    step = np.where(t == ESCAPE, ESCAPE, t + 1)
    return (np.cumsum(step) - 1)[t != ESCAPE]


def encodable(t: torch.Tensor) -> bool:
    """Whether `t` (float) holds few enough distinct nonzero values for one-byte codes."""
    if not t.is_floating_point():
        return False
    flat = t.detach().reshape(-1)
    return int(torch.unique(flat[flat != 0]).numel()) <= MAX_CODEBOOK


def encode(t: torch.Tensor) -> dict[str, bytes]:
    """A shared weight's streams: codebook (float32), gap tokens and codes (each zstd-coded)."""
    flat = t.detach().float().cpu().reshape(-1).numpy()
    positions = np.flatnonzero(flat)
    codebook, codes = np.unique(flat[positions], return_inverse=True)
    if len(codebook) > MAX_CODEBOOK:
        raise ValueError(f"{len(codebook)} distinct values: more than {MAX_CODEBOOK} (not shared)")
    return {
        "codebook": codebook.astype(np.float32).tobytes(),
        "gaps": _zstd(gap_tokens(positions).tobytes()),
        "codes": _zstd(codes.astype(np.uint8).tobytes()),
    }


def decode(streams: dict[str, bytes], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The weight `encode` stored, bit for bit."""
    d = zstandard.ZstdDecompressor()
    n = int(np.prod(shape)) if shape else 1
    codebook = np.frombuffer(streams["codebook"], dtype=np.float32)
    tokens = np.frombuffer(d.decompress(streams["gaps"], max_output_size=1 << 34), dtype=np.uint8)
    codes = np.frombuffer(d.decompress(streams["codes"], max_output_size=1 << 34), dtype=np.uint8)
    positions = positions_of(tokens)
    if len(positions) != len(codes) or (len(positions) and positions[-1] >= n):
        raise ValueError("shared weight: positions and codes disagree with the shape")
    out = np.zeros(n, dtype=np.float32)
    out[positions] = codebook[codes]
    return torch.from_numpy(out.reshape(shape)).to(dtype)
