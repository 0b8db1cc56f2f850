"""`structure: channel` made physical: the masked model becomes a smaller one before export.

Training keeps the dense shapes and zeroes whole output channels (rows of a Linear, filters of a
Conv, whole attention heads of the gpt: workers.compression.pruning.channel_masks). At export,
`slim` deletes them and shrinks every layer that depends on them, so model.onnx, model.int8.onnx
and model.safetensors hold the small model and onnxruntime runs fewer FLOPs.

Why a dependency-graph library (torch-pruning) for the graph models: which layers shrink with a
channel follows from the forward pass, not from names: the next layer's inputs, the BatchNorm
after a conv, every conv whose output is added into the same residual stream, and the slice of a
Linear's inputs a feature map's channel becomes after `flatten`. torch-pruning traces the
autograd graph once and derives those groups (and the flatten index mapping); hand-written
surgery would have to be redone for each model. Hand-written here: (1) which channels may go (a
channel leaves only when *every* layer producing it has a zero row there: residual streams are
coupled); (2) the bias folding (torch-pruning drops a channel, it does not preserve its output);
(3) transformer blocks (`_blocks_slim`: the registry gpt and HuggingFace GPT-2 alike): heads
live inside a fused qkv layer and a view by head_dim, which the graph cannot see (as FEASIBILITY
found for GPT-2, whose Conv1D layers torch-pruning does not know either), and the attention
module must learn its new head count.

Folding, exactly: a removed channel still outputs a constant (its bias, through BatchNorm,
activation and pooling), and the layers that consume it see that constant. Its effect is measured
where it lands: one probe forward captures each consumer's input; the removed inputs' part is
pushed through the consumer's float weight; for a Linear, or a conv whose
result is spatially uniform, it joins the bias; a padded conv sees the constant only inside the
image (the border pads zeros), so its effect is a fixed map, added after the conv (after its
BatchNorm, scaled by it, so BatchNorm folding at export stays valid) by an `Offset` module.
Masked and slim outputs are then equal up to float rounding. Training avoids most of these maps:
it zeroes a conv's bias and its BatchNorm's scale and shift with each removed filter
(`pruning.channel_followers`), so behind ReLU the channel outputs zero and folds to nothing; an
`Offset` remains for weights pruned elsewhere or activations with f(0) != 0, and costs speed
(bench/compression/widths.py).

The slim structure is recorded only in the weights' shapes (and `*.offset` buffers):
`conform` gives a freshly built registry model that structure, so every place that rebuilds a
model from saved weights (the export, model.packed) gets the slim one."""

from __future__ import annotations

import copy
import logging
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from service.errors import ExportError
from workers.compression.pruning import batchnorm_after, is_prunable, out_axis

log = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = nn.modules.batchnorm._BatchNorm


class Offset(nn.Module):
    """A constant map added to a conv's output: what removed input channels fed through padding."""

    def __init__(self, offset: torch.Tensor):
        super().__init__()
        self.register_buffer("offset", offset.detach().clone())

    def forward(self, x):
        return x + self.offset


def _is_gpt_attention(m: nn.Module) -> bool:
    from workers.models.gpt import CausalSelfAttention

    return isinstance(m, CausalSelfAttention)


def _is_hf_gpt2_attention(m: nn.Module) -> bool:
    """transformers' GPT-2 self-attention (looked up, never imported: a model holding one has
    imported it already)."""
    mod = sys.modules.get("transformers.models.gpt2.modeling_gpt2")
    cls = getattr(mod, "GPT2Attention", None)
    return cls is not None and isinstance(m, cls) and not m.is_cross_attention


@dataclass(frozen=True)
class Block:
    """What channel pruning shrinks in one transformer block, by layer name: the fused q,k,v
    layer (whole heads go), the attention's output projection (its inputs follow), the MLP's
    expansion (hidden units go) and its projection (its inputs follow). Both projections write
    into the residual stream and keep their outputs. The same for the registry gpt (Linear,
    weight (out, in)) and HuggingFace GPT-2 (Conv1D, weight (in, out)); `out_axis` tells them
    apart wherever a weight is cut."""

    attn: nn.Module
    qkv: str
    proj: str
    fc: str
    fc_proj: str


def transformer_blocks(model: nn.Module) -> list[Block]:
    """The registry gpt's and HuggingFace GPT-2's blocks (empty for any other model)."""
    out = []
    for name, b in model.named_modules():
        attn, p = getattr(b, "attn", None), f"{name}." if name else ""
        if attn is None:
            continue
        if _is_gpt_attention(attn):
            out.append(Block(attn, f"{p}attn.qkv", f"{p}attn.proj", f"{p}fc", f"{p}fc_proj"))
        elif _is_hf_gpt2_attention(attn):
            out.append(Block(attn, f"{p}attn.c_attn", f"{p}attn.c_proj", f"{p}mlp.c_fc", f"{p}mlp.c_proj"))
    return out


def n_heads(attn: nn.Module) -> int:
    return attn.n_head if _is_gpt_attention(attn) else attn.num_heads


def _set_heads(attn: nn.Module, heads: int) -> None:
    """The attention's head count after slimming; each head keeps its head_dim (so its scale)."""
    if _is_gpt_attention(attn):
        attn.n_head = heads
    else:  # GPT-2 splits q, k, v at split_size and views them by head_dim
        attn.num_heads = heads
        attn.split_size = heads * attn.head_dim


# --- which channels are gone ----------------------------------------------------------------


def zero_rows(m: nn.Module) -> list[int]:
    """Output channels of a Linear/Conv whose weights are all exactly zero (pruned)."""
    w = m.weight.detach().movedim(out_axis(m), 0).flatten(1)
    return torch.nonzero(~w.ne(0).any(dim=1)).flatten().tolist()


def head_units(attn: nn.Module) -> torch.Tensor:
    """The head of each output channel of an attention's fused qkv (q, k and v parts alike)."""
    inner = n_heads(attn) * attn.head_dim
    return (torch.arange(3 * inner) % inner) // attn.head_dim


def channel_plan(model: nn.Module) -> tuple[tuple[str, ...], dict[str, torch.Tensor]]:
    """(layers never channel-pruned, channel units by layer) for `structure: channel`, so that
    what training prunes can be deleted at export:
    - a transformer's residual writers (attention and MLP projections: `transformer_blocks`)
      keep their outputs: the residual width is kept; its fused qkv is pruned by whole heads
      (one unit per head, all of q, k and v);
    - a conv or Linear whose output is added into a residual stream (coupled with another
      producer in the dependency graph) keeps its rows: its channel could only leave together
      with every other producer of that stream.
    Other layers prune rows independently (units None)."""
    blocks = transformer_blocks(model)
    if blocks:
        units = {b.qkv: head_units(b.attn) for b in blocks}
        return tuple(n for b in blocks for n in (b.proj, b.fc_proj)), units
    skip: list[str] = []
    example = example_input(model)
    if example is None:
        return (), {}
    try:
        dg = _graph(model, example)
    except Exception as e:  # an unknown plugin model: prune rows, slim what the graph allows
        log.warning("channel pruning: no dependency graph of the model (%s); residual coupling unknown", e)
        return (), {}
    names = {m: n for n, m in model.named_modules()}
    for _name, m in model.named_modules():
        if not is_prunable(m) or dg.get_pruner_of_module(m) is None:
            continue
        group = dg.get_pruning_group(m, dg.get_pruner_of_module(m).prune_out_channels, [0])
        producers = [
            it.dep.target.module
            for it in group.items
            if dg.is_out_channel_pruning_fn(it.dep.handler) and is_prunable(it.dep.target.module)
        ]
        if len({id(p) for p in producers}) > 1:
            skip.append(names[m])
    return tuple(skip), {}


def slimmable(model: nn.Module) -> bool:
    """Whether `slim` can shrink `model`: a transformer it knows (`transformer_blocks`), or a
    registry model whose example input the dependency graph is traced with."""
    return bool(transformer_blocks(model)) or example_input(model) is not None


def example_input(model: nn.Module) -> torch.Tensor | None:
    """A zero input of the shape a registry model takes (None when it does not say)."""
    if getattr(model, "block_size", None):
        return torch.zeros(1, model.block_size, dtype=torch.long)
    adapter = getattr(model, "input", None)
    shape = getattr(adapter, "shape", None)
    if shape is None:
        return None
    return torch.zeros(2, math.prod(shape))


# --- the dependency graph -----------------------------------------------------------------------


def _graph(model: nn.Module, example: torch.Tensor):
    import torch_pruning as tp

    was = model.training
    model.eval()
    try:
        with torch.enable_grad():  # the graph is traced through autograd
            return tp.DependencyGraph().build_dependency(model, example_inputs=example)
    finally:
        model.train(was)


def _graph_groups(model: nn.Module, dg, skip: tuple[str, ...]) -> list[tuple[nn.Module, list[int]]]:
    """(root layer, channels to remove) per group: channels zero in every producing layer."""
    names = {m: n for n, m in model.named_modules()}
    done: set[int] = set()
    out = []
    for name, m in model.named_modules():
        if not is_prunable(m) or name in skip or id(m) in done or dg.get_pruner_of_module(m) is None:
            continue
        idxs = zero_rows(m)
        if not idxs:
            continue
        if len(idxs) == m.weight.shape[out_axis(m)]:
            idxs = idxs[1:]  # a layer keeps one channel (its constant is folded like the rest)
        fn = dg.get_pruner_of_module(m).prune_out_channels
        group = dg.get_pruning_group(m, fn, idxs)
        removable = set(idxs)
        for it in group.items:
            tgt = it.dep.target.module
            if not dg.is_out_channel_pruning_fn(it.dep.handler):
                continue
            if isinstance(tgt, _BN) or tgt is m or _traced_op(tgt):
                continue  # BatchNorm, activations, pooling, adds keep a constant constant
            if not is_prunable(tgt) or names.get(tgt) in skip:
                removable = set()  # an unknown producer (or the output layer) shares the channel
                break
            zero = set(zero_rows(tgt))
            for i, r in zip(it.idxs, it.root_idxs, strict=True):
                if i not in zero:
                    removable.discard(r)
        for it in group.items:
            if dg.is_out_channel_pruning_fn(it.dep.handler):
                done.add(id(it.dep.target.module))
        if removable:
            out.append((m, sorted(removable)))
    return out


def _traced_op(node) -> bool:
    """A node torch-pruning made for a function in the forward pass (activation, add, reshape,
    pooling), not a layer: it holds no weights of the channel."""
    return type(node).__module__.startswith("torch_pruning")


# --- folding ----------------------------------------------------------------------------------


def _effective_weight(m: nn.Module) -> torch.Tensor:
    # The float weight: folding keeps the float function exactly; a fake-quantized model's int8
    # grids are recomputed on the slim weights at export, as for any model.
    return m.weight


@torch.no_grad()
def _capture(model: nn.Module, consumers: list[nn.Module], example: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each consumer's input in one probe forward of the masked model, fake quantization off."""
    seen: dict[int, torch.Tensor] = {}

    def hook(mod, args):
        seen[id(mod)] = args[0].detach()

    handles = [c.register_forward_pre_hook(hook) for c in consumers]
    try:
        with _float(model):
            model(example)
    finally:
        for h in handles:
            h.remove()
    return seen


class _float:
    """Fake quantization off (its `enabled` flags) in the given models for a `with` block."""

    def __init__(self, *models: nn.Module):
        self.flags = [
            b for m in models for n, b in m.named_buffers() if n.endswith("enabled") and b.dtype == torch.bool
        ]

    def __enter__(self):
        self.saved = [bool(b) for b in self.flags]
        for b in self.flags:
            b.fill_(False)

    def __exit__(self, *exc):
        for b, v in zip(self.flags, self.saved, strict=True):
            b.fill_(v)


def _constant(x: torch.Tensor, what: str) -> torch.Tensor:
    """`x`'s first sample after checking every sample holds the same values (removed channels
    are constants of the input; anything else means they were not removed)."""
    first = x[:1]
    tol = 1e-5 * (1.0 + float(first.abs().max())) if first.numel() else 0.0
    if x.numel() and float((x - first).abs().max()) > tol:
        raise ExportError(f"channel slimming: removed inputs of {what} are not constant; cannot fold them")
    return first


@torch.no_grad()
def _fold_linear(m: nn.Module, x: torch.Tensor, idxs: list[int], name: str) -> None:
    """A Linear's (or a Conv1D's: weight (in, out)) removed inputs' constant into its bias."""
    flat = x.reshape(-1, x.shape[-1])[:, idxs]
    c = _constant(flat, name)[0]
    contrib = _effective_weight(m).movedim(out_axis(m), 0)[:, idxs] @ c
    _add_bias(m, contrib)


def _add_bias(m: nn.Module, contrib: torch.Tensor) -> None:
    if m.bias is None:
        m.bias = nn.Parameter(torch.zeros_like(contrib))
    m.bias.add_(contrib.to(m.bias.dtype))


@torch.no_grad()
def _fold_conv(m: nn.Module, x: torch.Tensor, idxs: list[int], name: str) -> torch.Tensor | None:
    """Fold into the bias where the effect is uniform; else return the map (out, *spatial)."""
    part = _constant(x[:, idxs], name)
    z = torch.zeros_like(x[:1])
    z[:, idxs] = part
    effect = m._conv_forward(z, _effective_weight(m), None)[0]
    mean = effect.flatten(1).mean(dim=1)
    shape = (-1, *([1] * (effect.dim() - 1)))
    if float((effect - mean.reshape(shape)).abs().max()) <= 1e-6 * (1.0 + float(effect.abs().max())):
        _add_bias(m, mean)
        return None
    return effect


# --- slimming ---------------------------------------------------------------------------------


def slim(
    model: nn.Module, example: torch.Tensor | None = None, skip: tuple[str, ...] = ()
) -> tuple[nn.Module, dict]:
    """A copy of the masked `model` with its removed channels deleted and their constants folded:
    (slim model, {"params_before", "params_after", "layers": {name: [out before, out after]}}).
    `skip`: layers whose channels stay (the output layer: its rows are the classes). The model
    is evaluated in eval mode; the copy comes back in eval mode."""
    masked, model = model, copy.deepcopy(model).eval()
    example = example if example is not None else example_input(model)
    if example is None:
        raise ExportError("channel slimming needs an example input of the model")
    before = {n: _out(m) for n, m in model.named_modules() if is_prunable(m)}
    params_before = sum(p.numel() for p in model.parameters())
    blocks = transformer_blocks(model)
    if blocks:
        _blocks_slim(model, blocks, example, skip)
    else:
        _graph_slim(model, example, skip)
    after = {n: _out(m) for n, m in model.named_modules() if is_prunable(m)}
    info = {
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
        "layers": {n: [before[n], after[n]] for n in before if n in after},
        "max_abs_diff": _check_equal(masked, model, example),
    }
    return model, info


@torch.no_grad()
def _check_equal(masked: nn.Module, slim_model: nn.Module, example: torch.Tensor) -> float:
    """The largest difference of the two models' outputs on `example`, with fake quantization
    off (the float function is what slimming keeps); ExportError beyond float rounding."""
    was = masked.training
    try:
        masked.eval()
        with _float(masked, slim_model):
            want, got = masked(example).float(), slim_model(example).float()
    finally:
        masked.train(was)
    diff = float((want - got).abs().max()) if want.numel() else 0.0
    if diff > 1e-4 * (1.0 + float(want.abs().max())):
        raise ExportError(f"channel slimming changed the model's outputs (max difference {diff:.3g})")
    return diff


def _out(m: nn.Module) -> int:
    return int(m.weight.shape[out_axis(m)])


def _graph_slim(model: nn.Module, example: torch.Tensor, skip: tuple[str, ...]) -> None:
    dg = _graph(model, example)
    names = {m: n for n, m in model.named_modules()}
    plans = _graph_groups(model, dg, skip)
    if not plans:
        return
    # What every group removes, from each layer's outputs and inputs (before anything changes).
    removed_out: dict[int, set[int]] = {}
    consumers: dict[int, tuple[nn.Module, set[int]]] = {}
    for root, idxs in plans:
        group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, idxs)
        for it in group.items:
            tgt = it.dep.target.module
            if dg.is_out_channel_pruning_fn(it.dep.handler) and is_prunable(tgt):
                removed_out.setdefault(id(tgt), set()).update(it.idxs)
            elif dg.is_in_channel_pruning_fn(it.dep.handler) and is_prunable(tgt):
                consumers.setdefault(id(tgt), (tgt, set()))[1].update(it.idxs)
    seen = _capture(model, [c for c, _ in consumers.values()], example)
    offsets: list[tuple[nn.Module, torch.Tensor]] = []
    for key, (c, idxs) in consumers.items():
        ix = sorted(idxs)
        if isinstance(c, _CONVS):
            effect = _fold_conv(c, seen[key], ix, names[c])
            if effect is not None:
                keep = [i for i in range(effect.shape[0]) if i not in removed_out.get(key, ())]
                offsets.append((c, effect[keep]))
        else:
            _fold_linear(c, seen[key], ix, names[c])
    for root, idxs in plans:
        dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, idxs).prune()
    for conv, effect in offsets:
        _insert_offset(model, names[conv], effect)


def _insert_offset(model: nn.Module, conv_name: str, effect: torch.Tensor) -> None:
    """Add `effect` after the conv (after its BatchNorm, times the BatchNorm's scale, where one
    follows: eval-mode BatchNorm is affine per channel, bn(y + e) = bn(y) + k * e)."""
    parent_name, _, child = conv_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        raise ExportError(f"channel slimming: {conv_name} is not in a Sequential; cannot add its offset")
    after = child
    found = batchnorm_after(parent, child)
    if found is not None:
        after, bn = found
        k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        effect = effect * k.reshape(-1, *([1] * (effect.dim() - 1)))
    _insert_after(parent, after, Offset(effect))


def _insert_after(parent: nn.Sequential, after: str, module: nn.Module) -> None:
    mods = OrderedDict()
    for n, m in parent._modules.items():
        mods[n] = m
        if n == after:
            mods[f"{after}_offset"] = module
    parent._modules = mods


def _blocks_slim(model: nn.Module, blocks: list[Block], example: torch.Tensor, skip: tuple[str, ...]) -> None:
    """Remove MLP hidden units (outputs of `fc`, inputs of `fc_proj`) and whole heads (a head
    whose v outputs are all zero outputs its v bias whatever its attention weights, since they
    sum to 1: a constant into `proj`) of each transformer block; the residual width stays.

    Hand-written, not torch-pruning's graph: the heads live inside one fused layer and a view by
    head_dim, which the autograd graph does not show (FEASIBILITY: GPT-2; with a custom Conv1D
    pruner registered, torch-pruning 1.6 couples c_attn's output k, of q, k or v, with c_proj's
    input k: the split is not index-mapped), and with the residual width kept each removal
    touches exactly two layers of one block, known by name. GPT-2's
    Conv1D (weight (in, out)) is cut along its own axes (`out_axis`), the same code as Linear."""
    work = []  # (consumer, removed input columns, producer, removed outputs, attention or None, kept heads)
    for b in blocks:
        fc = model.get_submodule(b.fc)
        rows = [] if b.fc in skip else zero_rows(fc)
        if len(rows) == _out(fc):
            rows = rows[1:]
        if rows:
            work.append((model.get_submodule(b.fc_proj), rows, fc, rows, None, None))
        if b.qkv in skip:
            continue
        qkv, hd, heads = model.get_submodule(b.qkv), b.attn.head_dim, n_heads(b.attn)
        inner = heads * hd
        zero = set(zero_rows(qkv))
        gone = [h for h in range(heads) if all(2 * inner + h * hd + j in zero for j in range(hd))]
        if len(gone) == heads:
            gone = gone[1:]
        if gone:
            cols = [h * hd + j for h in gone for j in range(hd)]
            qkv_rows = [p * inner + col for p in range(3) for col in cols]
            work.append((model.get_submodule(b.proj), cols, qkv, qkv_rows, b.attn, heads - len(gone)))
    if not work:
        return
    names = {m: n for n, m in model.named_modules()}
    seen = _capture(model, [w[0] for w in work], example)
    for consumer, cols, *_ in work:
        _fold_linear(consumer, seen[id(consumer)], cols, names[consumer])
    for consumer, cols, producer, rows, attn, heads in work:
        _keep(consumer, cols, 1 - out_axis(consumer))
        _keep(producer, rows, out_axis(producer))
        if attn is not None:
            _set_heads(attn, heads)


def _keep(m: nn.Module, removed: list[int], axis: int) -> None:
    """Delete `removed` along the weight's `axis` (and from the bias where that is the output
    axis) of a Linear or Conv1D, and update its feature counts."""
    gone = set(removed)
    keep = torch.tensor([i for i in range(m.weight.shape[axis]) if i not in gone], dtype=torch.long)
    m.weight = nn.Parameter(m.weight.detach().index_select(axis, keep).clone())
    if axis == out_axis(m) and m.bias is not None:
        m.bias = nn.Parameter(m.bias.detach()[keep].clone())
    _resize_attrs(m)


# --- rebuilding from saved weights -------------------------------------------------------------


def conform(model: nn.Module, state: dict[str, torch.Tensor]) -> dict | None:
    """Give a freshly built registry `model` the structure `state` was saved from (a slim
    model's): shrink its layers to the saved shapes, add the saved `Offset`s, and each
    transformer attention its head count. Returns the slim record of `slim` (None when nothing differs), also
    kept on the model as `model.channel_slim` for the report."""
    own = model.state_dict()
    if all(
        k in own and own[k].shape == v.shape for k, v in state.items() if not k.endswith(".offset")
    ) and not any(k.endswith(".offset") and k not in own for k in state):
        return None
    before = {n: _out(m) for n, m in model.named_modules() if is_prunable(m)}
    params_before = sum(p.numel() for p in model.parameters())
    blocks = transformer_blocks(model)
    for name, m in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        for pname, p in list(m._parameters.items()):
            key = prefix + pname
            if key in state and (p is None or p.shape != state[key].shape):
                m._parameters[pname] = nn.Parameter(torch.empty_like(state[key]))
        for bname, b in list(m._buffers.items()):
            key = prefix + bname
            if b is not None and key in state and b.shape != state[key].shape:
                m._buffers[bname] = torch.empty_like(state[key])
        _resize_attrs(m)
    for b in blocks:  # heads keep their head_dim: their number follows from the qkv's width
        _set_heads(b.attn, _out(model.get_submodule(b.qkv)) // (3 * b.attn.head_dim))
    for key, v in state.items():
        if key.endswith("_offset.offset") and key not in own:
            mod = key.removesuffix(".offset")
            parent_name, _, child = mod.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            _insert_after(parent, child.removesuffix("_offset"), Offset(torch.empty_like(v)))
    after = {n: _out(m) for n, m in model.named_modules() if is_prunable(m)}
    info = {
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
        "layers": {n: [before[n], after[n]] for n in before if n in after},
    }
    model.channel_slim = info
    return info


def _resize_attrs(m: nn.Module) -> None:
    if out_axis(m) == 1:  # transformers' Conv1D, weight (in, out)
        m.nx, m.nf = m.weight.shape
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, _CONVS):
        m.out_channels = m.weight.shape[0]
        m.in_channels = m.weight.shape[1] * m.groups
    elif isinstance(m, _BN) and m.weight is not None:
        m.num_features = m.weight.shape[0]


def structure_report(model: nn.Module) -> dict:
    """report.structure of a channel-pruned job, measured on the exported (rebuilt) model:
    parameters before and after slimming and each layer's output channels [before, after]."""
    rec = getattr(model, "channel_slim", None)
    total = sum(p.numel() for p in model.parameters())
    if rec is None:  # nothing was removed: the shipped model has the dense shapes
        rec = {"params_before": total, "params_after": total, "layers": {}}
    return {
        "slim": rec["params_after"] < rec["params_before"],
        "params_before": rec["params_before"],
        "params_after": total,
        "layers": {n: v for n, v in rec["layers"].items() if v[0] != v[1]},
    }
