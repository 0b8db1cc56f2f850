"""`slimtrain sweep ...`: submit a sweep (and follow it with a table of its trials), show one,
its Pareto front, cancel it. The commands share `api.cli`'s credentials and error handling."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live
from rich.table import Table

from api import render
from api.cli_common import AsJson, Token, Url, _api, console, out
from service.errors import SpecError
from service.spec import decode_spec_file
from service.sweeps.plan import check_request, parse_request

sweep_app = typer.Typer(no_args_is_help=True, help="Sweeps: many trials of one spec and their Pareto front.")

_OVER = {"succeeded", "failed", "cancelled", "pruned"}
_STATE_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
    "pruned": "yellow",
    "running": "cyan",
}


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def trials_table(sweep: dict, only_front: bool = False) -> Table:
    """One row per trial: its parameters (by their last path segment), state and measurements;
    `*` marks the Pareto front, `best` the pick under --max-accuracy-drop."""
    done = sum(1 for t in sweep["trials"] if t["state"] in _OVER)
    title = (
        f"sweep {sweep['id']} ({sweep['name']}): {sweep['state']}, {done}/{sweep['total_trials']} trials over"
    )
    if sweep.get("baseline_job"):
        acc = sweep.get("baseline_accuracy")
        title += f"; dense baseline {sweep['baseline_state']}" + (f" {acc:.4f}" if acc is not None else "")
    t = Table(title=title, title_justify="left")
    front = set(sweep["pareto"])
    params = list(sweep["trials"][0]["params"]) if sweep["trials"] else []
    t.add_column("#", justify="right")
    t.add_column("job")
    for p in params:
        t.add_column(p.rsplit(".", 1)[-1], justify="right")
    for name in ("state", "accuracy", "size ratio", "latency ms", "front"):
        t.add_column(name, justify="right" if name not in ("state", "front") else "left")
    for tr in sweep["trials"]:
        if only_front and tr["job_id"] not in front:
            continue
        style = _STATE_STYLE.get(tr["state"], "")
        mark = ("*" if tr["job_id"] in front else "") + (" best" if tr["job_id"] == sweep.get("best") else "")
        t.add_row(
            str(tr["index"]),
            tr["job_id"] or "-",
            *(str(tr["params"].get(p)) for p in params),
            f"[{style}]{tr['state']}[/]" if style else tr["state"],
            _num(tr["accuracy"], ".4f"),
            _num(tr["size_ratio"], ".1f"),
            _num(tr["latency_ms"], ".3f"),
            mark,
        )
    return t


def _load_request(path: Path) -> dict:
    """The request decoded and checked here first (same errors as the server's), or exit 2."""
    try:
        data = decode_spec_file(path)
        check_request(parse_request(data))
    except SpecError as e:
        console.print(render.spec_errors(e))
        raise typer.Exit(2) from None
    return data


@sweep_app.command("submit")
def submit(
    file: Annotated[Path, typer.Argument(help="Sweep request, YAML or JSON (examples/sweeps/).")],
    wait: Annotated[bool, typer.Option("--wait", help="Show the trials until the sweep ends.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --wait.", min=0.2)] = 2.0,
    as_json: AsJson = False,
    url: Url = None,
    token: Token = None,
):
    """Submit a sweep. With --wait: exit 0 when it succeeds, 1 when it fails or is cancelled."""
    data = _load_request(file)
    with _api(url, token) as api:
        created = api.submit_sweep(data)
        if not wait:
            if as_json:
                out.print_json(json.dumps(created))
            else:
                out.print(created["id"])
            return
        sweep = api.sweep(created["id"])
        with Live(trials_table(sweep), console=console, refresh_per_second=2, transient=as_json) as live:
            while sweep["state"] not in _OVER:
                time.sleep(interval)
                sweep = api.sweep(created["id"])
                live.update(trials_table(sweep))
    if as_json:
        out.print_json(json.dumps(sweep))
    if sweep["state"] != "succeeded":
        console.print(f"[red]{sweep['state']}:[/] {sweep.get('reason') or ''}")
        raise typer.Exit(1)


@sweep_app.command("status")
def status(
    sweep_id: Annotated[str, typer.Argument(help="Sweep id.")],
    as_json: AsJson = False,
    url: Url = None,
    token: Token = None,
):
    """Show a sweep: its state and every trial."""
    with _api(url, token) as api:
        sweep = api.sweep(sweep_id)
    if as_json:
        out.print_json(json.dumps(sweep))
    else:
        out.print(trials_table(sweep))


@sweep_app.command("front")
def front(
    sweep_id: Annotated[str, typer.Argument(help="Sweep id.")],
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(help="Mark the best trial losing at most this many accuracy points vs the baseline."),
    ] = None,
    as_json: AsJson = False,
    url: Url = None,
    token: Token = None,
):
    """The Pareto front: the trials no other trial beats on every objective."""
    with _api(url, token) as api:
        sweep = api.sweep(sweep_id, max_accuracy_drop)
    if as_json:
        front = [t for t in sweep["trials"] if t["job_id"] in set(sweep["pareto"])]
        out.print_json(json.dumps({"pareto": front, "best": sweep.get("best")}))
        return
    out.print(trials_table(sweep, only_front=True))
    if max_accuracy_drop is not None:
        out.print(f"best within {max_accuracy_drop} points: {sweep.get('best') or 'none qualifies'}")


@sweep_app.command("ls")
def ls(as_json: AsJson = False, url: Url = None, token: Token = None):
    """Your sweeps, newest first."""
    with _api(url, token) as api:
        items = api.sweeps()["items"]
    if as_json:
        out.print_json(json.dumps(items))
        return
    for s in items:
        out.print(f"{s['id']}  {s['name']}  {s['state']}  {s['total_trials']} trials")


@sweep_app.command("cancel")
def cancel(
    sweep_id: Annotated[str, typer.Argument(help="Sweep id.")],
    url: Url = None,
    token: Token = None,
):
    """Cancel a sweep and its queued and running trials."""
    with _api(url, token) as api:
        sweep = api.cancel_sweep(sweep_id)
    out.print(f"{sweep['id']} {sweep['state']}")
