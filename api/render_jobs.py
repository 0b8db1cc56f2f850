"""Rich renderings of the service's jobs for the CLI (`jobs`, `status`)."""

from __future__ import annotations

from rich.table import Table

_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan", "starting": "cyan"}


def _state(s: str) -> str:
    style = _STYLE.get(s)
    return f"[{style}]{s}[/]" if style else s


def _progress(job: dict) -> str:
    p = job.get("progress") or {}
    parts = []
    if p.get("step") is not None:
        parts.append(f"step {p['step']}" + (f"/{p['total_steps']}" if p.get("total_steps") else ""))
    if p.get("val_accuracy") is not None:
        parts.append(f"acc {p['val_accuracy']:.4f}")
    if p.get("sparsity") is not None:
        parts.append(f"sparsity {p['sparsity']:.3f}")
    return "  ".join(parts)


def jobs_table(jobs: list[dict]) -> Table:
    t = Table(title="Jobs", show_lines=False)
    for col in ("id", "name", "state", "progress", "created", "reason"):
        t.add_column(col, overflow="fold")
    for j in jobs:
        reason = (j.get("error") or {}).get("message") or j.get("reason") or ""
        t.add_row(j["id"], j["name"], _state(j["state"]), _progress(j), j["created_at"][:19], reason[:80])
    return t


def job_table(job: dict) -> Table:
    t = Table(title=f"Job {job['id']}", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value", overflow="fold")
    err = job.get("error")
    rows = [
        ("name", job["name"]),
        ("state", _state(job["state"])),
        ("reason", job.get("reason")),
        ("error", f"{err['code']}: {err['message']}" if err else None),
        ("progress", _progress(job) or None),
        ("attempts", f"{job['attempts']} of {job['max_attempts']}"),
        ("priority", str(job["priority"])),
        ("created", job["created_at"]),
        ("started", job.get("started_at")),
        ("finished", job.get("finished_at")),
    ]
    for k, v in rows:
        if v:
            t.add_row(k, v)
    return t
