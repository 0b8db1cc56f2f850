"""Rich renderings of the service's jobs for the CLI (`jobs`, `status`)."""

from __future__ import annotations

from rich import box
from rich.table import Table

from service.records import Phase, phase_label

_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan", "starting": "cyan"}


def _state(s: str) -> str:
    style = _STYLE.get(s)
    return f"[{style}]{s}[/]" if style else s


def _progress(job: dict) -> str:
    p = job.get("progress") or {}
    parts = []
    # The driver's phase while it runs, unless training (the step says that).
    if job.get("state") == "running" and p.get("phase") not in (None, Phase.TRAINING):
        parts.append(phase_label(p["phase"]))
    if p.get("step") is not None:
        parts.append(f"step {p['step']}" + (f"/{p['total_steps']}" if p.get("total_steps") else ""))
    if p.get("val_accuracy") is not None:
        parts.append(f"acc {p['val_accuracy']:.4f}")
    if p.get("sparsity") is not None:
        parts.append(f"sparsity {p['sparsity']:.3f}")
    return "  ".join(parts)


def jobs_table(jobs: list[dict]) -> Table:
    # No vertical rules: at 80 columns the room goes to the text.
    t = Table(title="Jobs", show_lines=False, box=box.SIMPLE_HEAD)
    # An id is never broken: `slimtrain jobs | grep ID` must find it whole on one line. The
    # other columns fold to make room for it.
    t.add_column("id", no_wrap=True, min_width=max((len(j["id"]) for j in jobs), default=2))
    t.add_column("name", overflow="fold")
    t.add_column("state", no_wrap=True)
    t.add_column("progress", overflow="fold", min_width=8)  # not "progres/s"
    for col in ("created", "reason"):
        t.add_column(col, overflow="fold")
    for j in jobs:
        reason = (j.get("error") or {}).get("message") or j.get("reason") or ""
        created = j["created_at"][:16].replace("T", " ")  # UTC, to the minute
        t.add_row(j["id"], j["name"], _state(j["state"]), _progress(j), created, reason[:80])
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
