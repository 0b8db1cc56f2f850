"""Rich renderings shared by the CLI commands."""

from __future__ import annotations

from collections import Counter

from rich.table import Table

from service.errors import SpecError


def spec_errors(err: SpecError, title: str = "Invalid job spec") -> Table:
    t = Table(title=title, title_style="bold red", show_lines=False)
    t.add_column("field", style="bold")
    t.add_column("problem")
    for e in err.errors or [{"field": "(spec)", "message": err.message}]:
        t.add_row(e["field"], e["message"])
    return t


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _pct(v) -> str | None:
    return None if v is None else f"{100 * v:.2f}%"


def _bytes(n) -> str | None:
    return None if n is None else f"{n:,} B"


def _latency_rows(lat: dict, same_artifact: bool) -> list[tuple[str, str]]:
    """One row per batch size: dense vs compressed and the speed-up; one figure where the shipped
    artifact is the dense model itself (nothing quantized): a ratio of it with itself is no speed-up."""
    rows = []
    batches = sorted(
        {k.partition("_batch")[2] or "1" for k in lat if k.startswith(("dense", "compressed"))}, key=int
    )
    for b in batches:
        suffix = "" if b == "1" else f"_batch{b}"
        d, c = lat.get(f"dense{suffix}"), lat.get(f"compressed{suffix}")
        if d is None or c is None:
            continue
        if same_artifact:
            rows.append((f"latency batch {b} (ms)", f"{c:.4f} (model.onnx: the dense model is what ships)"))
        else:
            rows.append((f"latency batch {b} (ms)", f"dense {d:.4f} / compressed {c:.4f} ({d / c:.2f}x)"))
    return rows


def devices_text(devices: list[str] | None) -> str | None:
    """The report's `devices` (one per rank) as people read it: `2 x cpu`, `cuda:0 (NVIDIA H200)`.
    None for reports written before the key existed."""
    if not devices:
        return None
    counts = Counter(devices)
    return ", ".join(d if n == 1 else f"{n} x {d}" for d, n in counts.items())


def report_table(rep: dict) -> Table:
    t = Table(title=f"Report: {rep.get('name', '')} ({rep.get('job_id', '')})", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    size = rep.get("size", {})
    q = rep.get("quantization") or {}
    quant = None
    if q.get("mode", "none") != "none":
        quant = f"{q['mode']}, int{q.get('bits', 8)} weights, activations {q.get('activations', '?')}"
        if q.get("codebook_bits"):
            quant += f", {2 ** q['codebook_bits']} shared codes per layer"
    acc, flt, dense = rep.get("accuracy"), rep.get("float_accuracy"), rep.get("dense_accuracy")
    rows = [
        ("model / data", f"{rep.get('model')} on {rep.get('data')}"),
        ("strategy / precision", f"{rep.get('strategy')} x{rep.get('workers')} / {rep.get('precision')}"),
        ("accuracy (artifact)", _pct(acc)),
        ("measured on", rep.get("accuracy_source")),
        ("float accuracy (PyTorch)", _pct(flt)),
        ("dense accuracy", _pct(dense)),
        ("accuracy vs dense", None if acc is None or dense is None else f"{100 * (acc - dense):+.2f} points"),
        ("perplexity", rep.get("perplexity")),
        ("quantization", quant),
        ("sparsity (global)", rep.get("sparsity", {}).get("global")),
        (
            "params nonzero / total",
            f"{_fmt(rep['params']['nonzero'])} / {_fmt(rep['params']['total'])}" if "params" in rep else None,
        ),
        ("size dense (fp32)", _bytes(size.get("dense_bytes"))),
        ("size compressed (packed)", _bytes(size.get("compressed_bytes"))),
        ("compression ratio", f"{size['ratio']:.1f}x" if size.get("ratio") else None),
        ("size model.onnx", _bytes(size.get("onnx_bytes"))),
        (f"size {q.get('onnx', 'quantized onnx')}", _bytes(size.get("onnx_quantized_bytes"))),
    ]
    lat = rep.get("latency_ms") or {}
    if all(isinstance(v, int | float) for v in lat.values()) and "dense" in lat and "compressed" in lat:
        rows += _latency_rows(lat, bool((rep.get("latency_setup") or {}).get("same_artifact")))
    else:  # reports written before batch sizes were split out
        for k, v in lat.items():
            rows.append(
                (
                    f"latency {k} (ms)",
                    v if not isinstance(v, dict) else ", ".join(f"{b}: {_fmt(x)}" for b, x in v.items()),
                )
            )
    setup = rep.get("latency_setup") or {}
    rows += [
        ("latency measured with", f"{setup['runtime']}, {setup['statistic']}" if setup else None),
        ("trained on", devices_text(rep.get("devices"))),
        ("steps", rep.get("steps")),
        ("samples / s", rep.get("samples_per_second")),
        ("wall seconds", rep.get("wall_seconds")),
        ("attempts", len(rep.get("attempts", [])) or None),
    ]
    for key, value in rows:
        if value is not None:
            t.add_row(key, _fmt(value))
    for w in rep.get("warnings", []):
        t.add_row("[yellow]warning[/]", w)
    layers = rep.get("sparsity", {}).get("layers")
    if layers:
        t.add_row("sparsity by layer", ", ".join(f"{n}: {s:.2f}" for n, s in layers.items()))
    return t
