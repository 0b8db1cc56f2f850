"""The `slimtrain` command line.

Exit codes: 0 success, 1 the job failed, 2 bad input (spec, arguments), 3 infrastructure error."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from api import render, render_jobs
from api.client import DEFAULT_URL, ApiError, Client, Unreachable
from service.errors import ArtifactKeyError, ConfigError, SlimtrainError, SpecError, TrainingFailed
from service.spec import JobSpec, json_schema, load_spec_file

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)
out = Console()

Url = Annotated[str, typer.Option("--url", envvar="SLIMTRAIN_URL", help="The slimtrain API.")]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="SLIMTRAIN_TOKEN",
        help="API token (default: the one `slimtrain serve` stored in the data dir).",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _settings():
    """The settings, or exit 2 naming each malformed SLIMTRAIN_ variable."""
    from pydantic import ValidationError

    from service.settings import get_settings

    try:
        return get_settings()
    except ValidationError as e:
        for err in e.errors():
            name = "SLIMTRAIN_" + "_".join(str(x) for x in err["loc"]).upper()
            console.print(f"[red]{name}:[/] {err['msg']}")
        raise typer.Exit(2) from None


def _load(spec_path: Path) -> JobSpec:
    try:
        return load_spec_file(spec_path)
    except SpecError as e:
        console.print(render.spec_errors(e))
        raise typer.Exit(2) from None


class RunProgress:
    """A progress bar fed by the driver's records: step, loss, accuracy, sparsity vs target."""

    def __init__(self, enabled: bool):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("starting", total=None, stats="")
        self.stats: dict = {}

    def __call__(self, rec: dict) -> None:
        kind, step = rec.get("kind"), rec.get("step")
        if rec.get("event") == "start":
            self.progress.update(
                self.task,
                total=rec["total_steps"],
                completed=rec["step"],
                description=f"attempt {rec.get('attempt', 1)}",
            )
            if rec.get("resumed_from") is not None:
                console.print(f"resumed from checkpoint at step {rec['resumed_from']}")
        if kind == "train":
            self.stats["loss"] = f"loss {rec['loss']:.4f}"
            if "sparsity" in rec:
                self.stats["sparsity"] = f"sparsity {rec['sparsity']:.3f}/{rec['target_sparsity']:.3f}"
        elif kind == "eval":
            self.stats["acc"] = f"acc {rec['val_accuracy']:.4f}"
        if step is not None:
            self.progress.update(self.task, completed=step, stats="  ".join(self.stats.values()))


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON.")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for the job's artifacts.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
):
    """Run one job locally through an embedded Ray head (or SLIMTRAIN_RAY_ADDRESS), no API."""
    job_spec = _load(spec)
    from service.artifacts import LocalArtifactStore, check_job_id, open_store
    from service.ids import new_job_id

    settings = _settings()
    if out_dir is not None:
        try:
            job_id = check_job_id(out_dir.resolve().name)
        except ArtifactKeyError:
            console.print(f"[red]--out: folder name {out_dir.name!r} must be letters, digits, '.', '_', '-'")
            raise typer.Exit(2) from None
        store = LocalArtifactStore(out_dir.resolve().parent)
    else:
        job_id = new_job_id()
        store = open_store(settings.resolved_artifact_uri, settings.s3_endpoint_url)

    from workers.driver import run_job
    from workers.ray_runtime import connect

    logging.getLogger("ray").setLevel(logging.WARNING)
    connect(settings.ray_address, log_to_driver=False)
    console.print(f"job [bold]{job_id}[/] -> {store.uri}/{job_id}")
    bar = RunProgress(enabled=not as_json)
    try:
        with bar.progress:
            report = run_job(job_spec, job_id, store, on_record=bar)
    except ConfigError as e:
        console.print(f"[red]cannot run:[/] {e.message}")
        raise typer.Exit(2) from None
    except TrainingFailed as e:
        console.print(f"[red]failed:[/] {e.message}")
        raise typer.Exit(1) from None
    if as_json:
        out.print_json(json.dumps(report))
    else:
        out.print(render.report_table(report))


@app.command()
def validate(spec: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON.")]):
    """Check a spec without running it; prints it with every default filled in."""
    job_spec = _load(spec)
    out.print_json(job_spec.model_dump_json())


@app.command()
def schema():
    """Print the JSON Schema of the job spec."""
    out.print_json(json.dumps(json_schema()))


@app.command()
def report(
    target: Annotated[str, typer.Argument(help="A job folder, or the id of a job on the server.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
):
    """Print a job's compression report (from a local job folder, or from the server)."""
    path = Path(target)
    if path.is_dir():
        rpath = path / "report.json"
        if not rpath.is_file():
            console.print(f"[red]{rpath} does not exist")
            raise typer.Exit(2)
        rep = json.loads(rpath.read_text())
    else:
        with _api(url, token) as api:
            rep = api.report(target)
    if as_json:
        out.print_json(json.dumps(rep))
    else:
        out.print(render.report_table(rep))


# --- the service: `serve`, and the commands that talk to it ---------------------------------------


@contextlib.contextmanager
def _api(url: str, token: str | None) -> Iterator[Client]:
    """A client of the API; its errors become messages and exit codes, never tracebacks."""
    from service.auth import local_token

    token = token or local_token(_settings())
    client = Client(url, token)
    try:
        yield client
    except ApiError as e:
        if e.fields:
            console.print(render.spec_errors(SpecError(e.message, e.fields)))
        else:
            console.print(f"[red]{e.code}:[/] {e.message}")
        if e.status == 401 and not token:
            console.print("pass --token or set SLIMTRAIN_TOKEN (the token `slimtrain serve` printed)")
        raise typer.Exit(2 if e.status < 500 else 3) from None
    except Unreachable as e:
        console.print(f"[red]unreachable:[/] {e}")
        raise typer.Exit(3) from None
    finally:
        client.close()


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default: SLIMTRAIN_HOST, 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: SLIMTRAIN_PORT, 8000).")] = None,
):
    """Run the API server. Without SLIMTRAIN_RAY_ADDRESS it starts a local Ray head (token auth,
    loopback only); without SLIMTRAIN_API_TOKENS it creates a token for tenant `default`."""
    import uvicorn

    from service.auth import TokenConfigError, load_auth, token_file

    settings = _settings()
    settings = settings.model_copy(update={"host": host or settings.host, "port": port or settings.port})
    try:
        auth, new_token = load_auth(settings, create=True)
    except TokenConfigError as e:
        console.print(f"[red]{e.message}")
        raise typer.Exit(2) from None
    if new_token:
        console.print(f"API token for tenant [bold]default[/] (shown once; kept in {token_file(settings)}):")
        out.print(new_token, soft_wrap=True)
    if not settings.ray_address and not settings.ray_dashboard_url:
        import ray

        from workers.ray_runtime import connect

        logging.getLogger("ray").setLevel(logging.WARNING)
        connect(None, include_dashboard=True, dashboard_port=settings.ray_dashboard_port, log_to_driver=False)
        settings = settings.model_copy(update={"ray_address": ray.get_runtime_context().gcs_address})
        console.print(f"embedded Ray head at {settings.ray_address} (loopback, token auth)")
    from api.app import create_app

    console.print(f"slimtrain API on http://{settings.host}:{settings.port}  (data in {settings.data_dir})")
    # Idle keep-alive connections must be closed by the client (httpx: 5 s; load balancers:
    # 60 s), never by the server first: uvicorn's default of 5 s made a request sent just as the
    # server closed its connection get no answer at all (bench/load/keepalive_race.py).
    uvicorn.run(
        create_app(settings, auth=auth),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_keep_alive=75,
    )


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON.")],
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the job with a progress bar until it ends.")
    ] = False,
    idempotency_key: Annotated[
        str | None, typer.Option("--idempotency-key", help="Submit at most once under this key.")
    ] = None,
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
):
    """Submit a job to the server. With --wait: exit 0 when it succeeds, 1 when it fails."""
    _load(spec)  # the server checks again; this fails fast with the same field-by-field table
    data = yaml.safe_load(spec.read_text())
    with _api(url, token) as api:
        job = api.submit(data, idempotency_key)
        if not wait:
            if as_json:
                out.print_json(json.dumps(job))
            else:
                out.print(job["id"])
            return
        console.print(f"job [bold]{job['id']}[/] {job['state']}")
        final = _follow(api, job["id"], progress=not as_json)
        if as_json:
            out.print_json(json.dumps(final))
        elif final["state"] == "succeeded":
            out.print(render.report_table(api.report(job["id"])))
    if final["state"] != "succeeded":
        err = final.get("error") or {}
        console.print(f"[red]{final['state']}:[/] {err.get('message') or final.get('reason') or ''}")
        raise typer.Exit(1)


def _follow(api: Client, job_id: str, progress: bool) -> dict:
    """Show a job's events (a progress bar fed by its metrics) until its final state."""
    bar = RunProgress(enabled=progress)
    with bar.progress:
        for ev in api.events(job_id):
            if ev.type == "metric":
                bar(ev.data)
            elif ev.type == "state":
                reason = f": {ev.data['reason']}" if ev.data.get("reason") else ""
                bar.progress.update(bar.task, description=ev.data["state"])
                if progress:
                    console.print(f"{ev.data['state']}{reason}")
    return api.job(job_id)


@app.command()
def jobs(
    state: Annotated[
        list[str] | None, typer.Option("--state", help="Only jobs in this state (repeatable).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="How many.")] = 50,
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
):
    """List your jobs, newest first."""
    with _api(url, token) as api:
        page = api.jobs(state, limit)
    if as_json:
        out.print_json(json.dumps(page))
    else:
        out.print(render_jobs.jobs_table(page["items"]))


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
):
    """Show one job: state, reason, progress, attempts."""
    with _api(url, token) as api:
        job = api.job(job_id)
    if as_json:
        out.print_json(json.dumps(job))
    else:
        out.print(render_jobs.job_table(job))


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
):
    """Print the driver's log of a job."""
    with _api(url, token) as api:
        if follow:
            for chunk in api.follow_logs(job_id):
                out.file.write(chunk)
                out.file.flush()
        else:
            out.file.write(api.logs(job_id))


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
):
    """Cancel a job (its Ray job is stopped)."""
    with _api(url, token) as api:
        job = api.cancel(job_id)
    if as_json:
        out.print_json(json.dumps(job))
    else:
        out.print(f"{job['id']} {job['state']}")


@app.command()
def download(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    dest: Annotated[Path, typer.Argument(help="Folder to write the artifacts into.")],
    checkpoints: Annotated[bool, typer.Option("--checkpoints", help="Also the checkpoints.")] = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
):
    """Download a job's artifacts, checked against its manifest.json (sha256)."""
    with _api(url, token) as api:
        items = [a for a in api.artifacts(job_id) if checkpoints or not a["name"].startswith("checkpoints/")]
        total = sum(a["size"] for a in items)
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), console=console
        )
        with progress:
            task = progress.add_task("download", total=total)
            for a in items:
                progress.update(task, description=a["name"])
                api.download(job_id, a["name"], dest / a["name"], lambda n: progress.advance(task, n))
    bad = _verify_manifest(dest)
    if bad:
        console.print(f"[red]checksum mismatch:[/] {', '.join(bad)}")
        raise typer.Exit(3)
    console.print(f"{len(items)} artifacts, {total:,} bytes -> {dest}")


def _verify_manifest(folder: Path) -> list[str]:
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        return []
    bad = []
    for e in json.loads(mpath.read_text()).get("artifacts", []):
        p = folder / e["name"]
        if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != e["sha256"]:
            bad.append(e["name"])
    return bad


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except SlimtrainError as e:
        console.print(f"[red]{e.code}:[/] {e.message}")
        sys.exit(3)


if __name__ == "__main__":
    main()
