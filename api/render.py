"""Rich renderings shared by the CLI commands."""

from __future__ import annotations

from rich.table import Table

from service.errors import SpecError


def spec_errors(err: SpecError) -> Table:
    t = Table(title="Invalid job spec", title_style="bold red", show_lines=False)
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


def report_table(rep: dict) -> Table:
    t = Table(title=f"Report: {rep.get('name', '')} ({rep.get('job_id', '')})", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    size = rep.get("size", {})
    rows = [
        ("model / data", f"{rep.get('model')} on {rep.get('data')}"),
        ("strategy / precision", f"{rep.get('strategy')} x{rep.get('workers')} / {rep.get('precision')}"),
        ("accuracy (artifact)", rep.get("accuracy")),
        ("float accuracy", rep.get("float_accuracy")),
        ("dense accuracy", rep.get("dense_accuracy")),
        ("perplexity", rep.get("perplexity")),
        ("sparsity (global)", rep.get("sparsity", {}).get("global")),
        (
            "params nonzero / total",
            f"{_fmt(rep['params']['nonzero'])} / {_fmt(rep['params']['total'])}" if "params" in rep else None,
        ),
        ("size dense (fp32)", f"{_fmt(size.get('dense_bytes'))} B" if size else None),
        ("size compressed", f"{_fmt(size.get('compressed_bytes'))} B" if size else None),
        ("compression ratio", f"{size['ratio']:.1f}x" if size.get("ratio") else None),
    ]
    lat = rep.get("latency_ms") or {}
    for k, v in lat.items():
        if isinstance(v, dict):
            rows.append((f"latency {k} (ms)", ", ".join(f"{b}: {_fmt(x)}" for b, x in v.items())))
        else:
            rows.append((f"latency {k} (ms)", v))
    rows += [
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
