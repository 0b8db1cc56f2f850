"""The `slimtrain` command line.

Exit codes: 0 success, 1 the job failed, 2 bad input (spec, arguments), 3 infrastructure error."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from api import render, render_jobs
from api.cli_common import AsJson, Token, Url, _api, _settings, console, out
from api.client import (
    Client,
    config_path,
    write_config,
)
from api.sweep_cli import sweep_app
from service.artifacts import (
    MANIFEST,
    NOT_IN_MANIFEST,
    check_job_id,
    check_name,
    manifest_files,
    verify_files,
)
from service.errors import ArtifactKeyError, ConfigError, SlimtrainError, SpecError, TrainingFailed
from service.records import PHASE_KIND, Phase, phase_label
from service.spec import JobSpec, decode_spec_file, json_schema, parse_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _load(spec_path: Path) -> JobSpec:
    return _load_with_data(spec_path)[0]


def _load_with_data(spec_path: Path) -> tuple[JobSpec, Any]:
    """The spec validated and the data it was decoded from, from one read of the file."""
    try:
        data = decode_spec_file(spec_path)
        return parse_spec(data), data
    except SpecError as e:
        console.print(render.spec_errors(e))
        raise typer.Exit(2) from None


class StepsColumn(ProgressColumn):
    """`step/total` while the total is known; nothing otherwise (never "0/None")."""

    def render(self, task) -> Text:
        if task.total is None:
            return Text("")
        return Text(f"{int(task.completed)}/{int(task.total)}")


class RunProgress:
    """A progress bar fed by a job's records and states. Its label is what the job does now: its
    state while it waits (queued, starting), then the driver's phase (service.records) with that
    phase's own progress: step/total while training, a spinner for the others. Each change is
    also printed as a line, with how long the previous phase took."""

    def __init__(self, enabled: bool, state: str | None = None, reason: str | None = None):
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            StepsColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
        )
        self.enabled = enabled
        # The state the caller knows (submit's answer). The event stream replays the job's
        # history from its first event; a replayed state equal to this one is not news.
        self.state, self.reason = state, reason
        self.phase: str | None = None
        self.phase_since: float | None = None
        self.total: int | None = None
        self.task = self.progress.add_task(state or "starting", total=None, stats="")
        self.stats: dict = {}

    def _show(self, description: str, total: int | None, **fields) -> None:
        # Progress.update cannot take a total back to None (an indeterminate, pulsing bar);
        # the task object can.
        self.progress.update(self.task, description=description, total=total, **fields)
        if total is None:
            next(t for t in self.progress.tasks if t.id == self.task).total = None

    def say(self, line: str) -> None:
        if self.enabled:
            self.progress.console.print(line)

    def state_changed(self, state: str, reason: str | None = None) -> None:
        if state == self.state and reason == self.reason:
            return
        self.say(f"{state}: {reason}" if reason else state)
        self.state, self.reason = state, reason
        if state == "running" and self.phase is not None:
            return  # the phase says more than "running"
        if state != "running":
            self.phase = None  # queued again (a retry), or over: the next attempt starts anew
        self._show(state, None)

    def _enter(self, phase: str, step: int | None, total: int | None, at: float | None) -> None:
        self.total = total or self.total
        training = phase == Phase.TRAINING
        if phase != self.phase:
            took = ""
            if self.phase is not None and self.phase_since is not None and at is not None:
                took = f"  ({phase_label(self.phase)} took {at - self.phase_since:.1f} s)"
            where = f" from step {step} of {self.total}" if training and self.total else ""
            self.say(f"{phase_label(phase)}{where}{took}")
            self.phase, self.phase_since = phase, at
        self._show(
            phase_label(phase),
            self.total if training else None,
            **({"completed": step} if training and step is not None else {}),
        )

    def __call__(self, rec: dict) -> None:
        kind, step = rec.get("kind"), rec.get("step")
        if kind == PHASE_KIND:
            self._enter(str(rec.get("phase")), step, rec.get("total_steps"), rec.get("time"))
            return
        if rec.get("event") == "start":
            attempt = rec.get("attempt", 1)
            if rec.get("resumed_from") is not None:
                self.say(f"attempt {attempt}: resumed from the checkpoint at step {rec['resumed_from']}")
            # A driver from before phase records says "training" this way only.
            self._enter(Phase.TRAINING, step, rec.get("total_steps"), rec.get("time"))
        if kind == "train":
            self.stats["loss"] = f"loss {rec['loss']:.4f}"
            if "sparsity" in rec:
                self.stats["sparsity"] = f"sparsity {rec['sparsity']:.3f}/{rec['target_sparsity']:.3f}"
        elif kind == "eval":
            self.stats["acc"] = f"acc {rec['val_accuracy']:.4f}"
        fields = {"stats": "  ".join(self.stats.values())}
        if step is not None and self.phase == Phase.TRAINING:
            fields["completed"] = step
        self.progress.update(self.task, **fields)


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

    from service.datasets import resolve_sources
    from workers.driver import run_job
    from workers.ray_runtime import connect

    # One user here: store:// names are the `default` tenant's, as `slimtrain serve` has them, and
    # s3:// is read with the user's own credentials, so no allow-list applies.
    try:
        job_spec = resolve_sources(job_spec, "default", store)
    except SpecError as e:
        console.print(f"[red]cannot run:[/] {e.message}")
        raise typer.Exit(2) from None
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
    target: Annotated[
        str,
        typer.Argument(
            help="A job folder (or its report.json), or the id of a job on the server. A folder "
            "that exists here wins; anything with a '/' or starting with '.' or '~' is a folder."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    url: Url = None,
    token: Token = None,
):
    """Print a job's compression report (from a local job folder, or from the server)."""
    local = _local_report(target)
    if local is not None:
        rep = local
    else:
        with _api(url, token, hint=f"(and there is no folder {target!r} here)") as api:
            rep = api.report(target)
    if as_json:
        out.print_json(json.dumps(rep))
    else:
        out.print(render.report_table(rep))


# --- the service: `serve`, and the commands that talk to it ---------------------------------------


def _local_report(target: str) -> dict | None:
    """The report of a local job folder (or a report.json file); None when `target` is a job id
    for the server. Rule: an existing folder or file is local; a name that cannot be a job id
    because it has a '/' (or starts with '.' or '~') is a folder, and exits 2 when missing."""
    path = Path(target).expanduser()
    if path.is_dir():
        path = path / "report.json"
        if not path.is_file():
            console.print(
                f"[red]{path} does not exist[/] (the job is not finished, or the folder is not a job's)",
                soft_wrap=True,
            )
            raise typer.Exit(2)
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            console.print(f"[red]{path}: not a readable report ({e})")
            raise typer.Exit(2) from None
    if "/" in target or os.sep in target or target.startswith((".", "~")):
        console.print(f"[red]folder {target} does not exist", soft_wrap=True)
        raise typer.Exit(2)
    try:
        check_job_id(target)
    except ArtifactKeyError:
        console.print(f"[red]{target!r} is neither a folder here nor a job id")
        raise typer.Exit(2) from None
    return None


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
        _remember(settings, new_token)
    if not settings.ray_address and not settings.ray_dashboard_url:
        import ray

        from workers.ray_runtime import connect, lower_head_priority

        logging.getLogger("ray").setLevel(logging.WARNING)
        connect(None, include_dashboard=True, dashboard_port=settings.ray_dashboard_port, log_to_driver=False)
        lower_head_priority(settings.ray_nice)
        settings = settings.model_copy(update={"ray_address": ray.get_runtime_context().gcs_address})
        console.print(f"embedded Ray head at {settings.ray_address} (loopback, token auth)")
    from api.app import create_app

    console.print(f"slimtrain API on http://{settings.host}:{settings.port}  (data in {settings.data_dir})")
    # Idle keep-alive connections must be closed by the client (httpx: 5 s; load balancers:
    # 60 s), never by the server first: uvicorn's default of 5 s made a request sent just as the
    # server closed its connection get no answer at all (bench/load/keepalive_race.py).
    # uvloop and httptools by name, not uvicorn's "auto": a missing C stack fails the start rather
    # than fall back silently to asyncio + h11, which served 0.72-0.76x the GET job req/s
    # (bench/README.md, "API at one and two processes").
    uvicorn.run(
        create_app(settings, auth=auth, freeze_gc=True),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_keep_alive=75,
        loop="uvloop",
        http="httptools",
    )


def _remember(settings, token: str) -> None:
    """Write the user config file with this server's url and its new token, so the CLI finds
    them from any folder; a file the user owns is left alone (api.client.write_config)."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    host = f"[{host}]" if ":" in host else host
    path = config_path()
    try:
        written = write_config(path, f"http://{host}:{settings.port}", token)
    except OSError as e:
        console.print(
            f"[yellow]could not write {path}: {e}[/] (the CLI still finds the token in the data dir)"
        )
        return
    if written:
        console.print(f"the CLI finds the URL and token in {path} (mode 0600)")
    else:
        console.print(
            f"[yellow]{path} is yours, so it was not changed:[/] set token = the token above there, "
            "or pass --token / SLIMTRAIN_TOKEN"
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
    url: Url = None,
    token: Token = None,
):
    """Submit a job to the server. With --wait: exit 0 when it succeeds, 1 when it fails."""
    # The server checks again; this fails fast with the same field-by-field table, and sends
    # exactly what it checked.
    _, data = _load_with_data(spec)
    with _api(url, token) as api:
        job = api.submit(data, idempotency_key)
        if not wait:
            if as_json:
                out.print_json(json.dumps(job))
            else:
                out.print(job["id"])
            return
        reason = f": {job['reason']}" if job.get("reason") else ""
        console.print(f"job [bold]{job['id']}[/] {job['state']}{reason}")
        final = _follow(api, job, progress=not as_json)
        if as_json:
            out.print_json(json.dumps(final))
        elif final["state"] == "succeeded":
            out.print(render.report_table(api.report(job["id"])))
    if final["state"] != "succeeded":
        err = final.get("error") or {}
        console.print(f"[red]{final['state']}:[/] {err.get('message') or final.get('reason') or ''}")
        raise typer.Exit(1)


def _follow(api: Client, job: dict, progress: bool) -> dict:
    """Show a job's events (a progress bar fed by its metrics and phases) until its final state.
    The bar starts from the state the caller knows, never from a made-up one: it used to start
    as "starting" and then replay the job's first event, "queued", which read as a flicker
    starting -> queued -> starting."""
    bar = RunProgress(enabled=progress, state=job["state"], reason=job.get("reason"))
    with bar.progress:
        for ev in api.events(job["id"]):
            if ev.type == "metric":
                bar(ev.data)
            elif ev.type == "state":
                bar.state_changed(ev.data["state"], ev.data.get("reason"))
    return api.job(job["id"])


@app.command()
def jobs(
    state: Annotated[
        list[str] | None, typer.Option("--state", help="Only jobs in this state (repeatable).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="How many.")] = 50,
    as_json: AsJson = False,
    url: Url = None,
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
    url: Url = None,
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
    url: Url = None,
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
    url: Url = None,
    token: Token = None,
):
    """Cancel a job (its Ray job is stopped)."""
    with _api(url, token) as api:
        job = api.cancel(job_id)
    if as_json:
        out.print_json(json.dumps(job))
    else:
        out.print(f"{job['id']} {job['state']}")


model_app = typer.Typer(
    no_args_is_help=True, help="Your uploaded weights, which jobs start from (model.init)."
)
app.add_typer(model_app, name="model")


@model_app.command("push")
def model_push(
    file: Annotated[Path, typer.Argument(help="A .safetensors file.", exists=True, dir_okay=False)],
    name: Annotated[str, typer.Argument(help="Its name: jobs use it as store://models/NAME.")],
    as_json: AsJson = False,
    url: Url = None,
    token: Token = None,
):
    """Upload weights (safetensors) as NAME; a job starts from them with
    `model: {init: {uri: store://models/NAME}}`."""
    _push("models", file, name, {}, as_json, url, token)


def _push(kind: str, file: Path, name: str, params: dict, as_json: bool, url, token) -> None:
    """Upload `file` as the tenant's `kind` (models, datasets) NAME, streamed from disk under a
    progress bar; the server's refusal (422 naming what is wrong, 413) exits 2."""
    with _api(url, token) as api:
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), console=console
        )
        with progress:
            task = progress.add_task(f"push {name}", total=file.stat().st_size)
            entry = api.push(kind, file, name, lambda n: progress.advance(task, n), params)
    if as_json:
        out.print_json(json.dumps(entry))
    else:
        out.print(f"{entry['name']}  {entry['size']:,} bytes  sha256 {entry['sha256']}")


@model_app.command("ls")
def model_ls(as_json: AsJson = False, url: Url = None, token: Token = None):
    """List your models."""
    with _api(url, token) as api:
        items = api.list_uploads("models")
    if as_json:
        out.print_json(json.dumps(items))
        return
    for m in items:
        out.print(f"{m['name']}  {m['size']:,} bytes  {m['created']}  sha256 {m['sha256']}")


@model_app.command("rm")
def model_rm(
    name: Annotated[str, typer.Argument(help="The model's name.")], url: Url = None, token: Token = None
):
    """Delete one of your models."""
    _rm("models", name, url, token)


def _rm(kind: str, name: str, url, token) -> None:
    with _api(url, token) as api:
        api.delete_upload(kind, name)
    out.print(f"{name} deleted")


dataset_app = typer.Typer(
    no_args_is_help=True, help="Your uploaded datasets, which jobs read (data.uri, data.tokenizer)."
)
app.add_typer(dataset_app, name="dataset")


@dataset_app.command("push")
def dataset_push(
    file: Annotated[
        Path,
        typer.Argument(help="A dataset file, or a folder of shards (a set).", exists=True),
    ],
    name: Annotated[
        str | None,
        typer.Argument(
            help="Its name (default: the file's or folder's): jobs use store://datasets/NAME, "
            "a folder's set store://datasets/NAME/."
        ),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="npz, parquet, jsonl, text, image_zip, image_tar or tokenizer; default: from NAME's "
            "ending (a folder: each file's).",
        ),
    ] = None,
    label_column: Annotated[
        str | None,
        typer.Option("--label-column", help="parquet: the column of class labels (default: label)."),
    ] = None,
    text_column: Annotated[
        str | None,
        typer.Option("--text-column", help="jsonl: the field holding each document (default: text)."),
    ] = None,
    as_json: AsJson = False,
    url: Url = None,
    token: Token = None,
):
    """Upload a dataset file as NAME, checked on arrival as a job will read it; a job reads it
    with `data: {uri: store://datasets/NAME}` (a tokenizer.json: `data.tokenizer`).

    A folder is a set of shards (as Spark or Ray Data write a table): each file in it is
    uploaded as NAME/FILE, in sorted order, and a job reads them all as one dataset with
    `data: {uri: store://datasets/NAME/}`. Names starting with '_' or '.' (_SUCCESS, .crc) are
    skipped, as the readers skip them; anything else must be a shard of the one format. All or
    nothing: NAME must not exist yet, and when a shard fails the shards already stored are
    deleted again (the report says which, and what stays when that too fails)."""
    params = {"format": fmt, "label_column": label_column, "text_column": text_column}
    if file.is_dir():
        _push_folder(file, name or file.name, params, as_json, url, token)
    else:
        _push("datasets", file, name or file.name, params, as_json, url, token)


def _push_folder(folder: Path, name: str, params: dict, as_json: bool, url, token) -> None:
    from api.dataset_sets import FolderRefused, PushFailed, existing_shards, plan_folder, push_set, set_name

    try:
        name = set_name(name)
        shards = plan_folder(folder, params["format"])
    except FolderRefused as e:
        console.print(f"[red]refused:[/] {e}", soft_wrap=True)
        raise typer.Exit(2) from None
    with _api(url, token) as api:
        there = existing_shards(api.list_uploads("datasets"), name)
        if there:
            console.print(
                f"[red]refused:[/] {name}/ already exists ({len(there)} files: {', '.join(there[:3])}"
                f"{', ...' if len(there) > 3 else ''}); pushing into it would mix two uploads. "
                f"Delete it first with `slimtrain dataset rm {name}`",
                soft_wrap=True,
            )
            raise typer.Exit(2)
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[files]}"),
            console=console,
        )
        done = 0

        def next_shard(shard) -> None:
            nonlocal done
            progress.update(task, description=f"{name}/{shard.name}", files=f"file {done + 1}/{len(shards)}")
            done += 1

        try:
            with progress:
                total = sum(s.size for s in shards)
                task = progress.add_task(f"push {name}/", total=total, files=f"0/{len(shards)} files")
                entries = push_set(api, name, shards, params, lambda n: progress.advance(task, n), next_shard)
                progress.update(task, description=f"push {name}/", files=f"{len(shards)} files")
        except PushFailed as e:
            for line in e.report():
                console.print(f"[red]{line}", soft_wrap=True)
            if isinstance(e.cause, KeyboardInterrupt):
                raise typer.Exit(130) from None
            # _api says what failed it: the server's refusal (its 4xx message, exit 2; 5xx: 3)
            # or the lost connection (exit 3).
            raise e.cause from None
    if as_json:
        out.print_json(json.dumps({"name": name + "/", "shards": entries}))
        return
    for entry in entries:
        out.print(f"{entry['name']}  {entry['size']:,} bytes  sha256 {entry['sha256']}")
    size = sum(e["size"] for e in entries)
    out.print(f"{name}/  {len(entries)} files  {size:,} bytes  -> store://datasets/{name}/")


@dataset_app.command("ls")
def dataset_ls(as_json: AsJson = False, url: Url = None, token: Token = None):
    """List your datasets; a set of shards is one line, SET/ (--json: every upload, a shard by its
    name SET/SHARD, as GET /v1/datasets gives them)."""
    from api.dataset_sets import group_sets

    with _api(url, token) as api:
        items = api.list_uploads("datasets")
    if as_json:
        out.print_json(json.dumps(items))
        return
    for d in group_sets(items):
        shards = f"  {d['shards']} shards" if "shards" in d else ""
        classes = f"  {d['num_classes']} classes" if d.get("num_classes") is not None else ""
        out.print(
            f"{d['name']}  {d['format']}{shards}  {d['samples']:,} samples{classes}  "
            f"{d['size']:,} bytes  {d['created']}"
        )


@dataset_app.command("rm")
def dataset_rm(
    name: Annotated[str, typer.Argument(help="The dataset's name.")], url: Url = None, token: Token = None
):
    """Delete one of your datasets, or a whole set of shards (SET or SET/)."""
    _rm("datasets", name.removesuffix("/") or name, url, token)


# In a download folder: the id of the job whose files it holds, written before the first file,
# so even an interrupted download says whose files these are.
DOWNLOAD_MARK = ".slimtrain-job"


def _download_guard(dest: Path, job_id: str, names: list[str], force: bool) -> None:
    """Exit 2 rather than write into `dest` over another job's files (or files slimtrain did not
    write): the folder's mark (or its manifest's job_id) names another job, or a file to be
    written already exists in an unmarked folder. --force writes anyway."""
    if force or not dest.exists():
        return
    if not dest.is_dir():
        console.print(f"[red]{dest} exists and is not a folder")
        raise typer.Exit(2)
    owner = None
    with contextlib.suppress(OSError):
        owner = (dest / DOWNLOAD_MARK).read_text().strip() or None
    if owner is None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            owner = json.loads((dest / MANIFEST).read_text()).get("job_id")
    if owner == job_id:
        return
    clashes = [n for n in names if (dest / n).exists()]
    if owner is not None or clashes:
        whose = f"job {owner}'s files" if owner else f"files of its own ({', '.join(clashes[:3])})"
        console.print(
            f"[red]{dest} holds {whose}:[/] download job {job_id} into another folder, or pass --force "
            "to overwrite them"
        )
        raise typer.Exit(2)


@app.command()
def download(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    dest: Annotated[Path, typer.Argument(help="Folder to write the artifacts into.")],
    checkpoints: Annotated[bool, typer.Option("--checkpoints", help="Also the checkpoints.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Write even into a folder that holds another job's files.")
    ] = False,
    url: Url = None,
    token: Token = None,
):
    """Download a finished job's artifacts: what its manifest.json lists, each checked against
    its sha256 (with --checkpoints also the checkpoints, each checked against its own manifest).
    A job without a manifest yet (still running, or failed) gets every artifact, unchecked."""
    with _api(url, token) as api:
        listing = api.artifacts(job_id)
        manifest_raw = None
        if any(a["name"] == MANIFEST for a in listing):
            manifest_raw = api.artifact_bytes(job_id, MANIFEST)
        try:
            files = manifest_files(json.loads(manifest_raw)) if manifest_raw is not None else None
        except ValueError as e:
            console.print(f"[red]the job's {MANIFEST} is unreadable:[/] {e}")
            raise typer.Exit(3) from None
        if files is not None:
            items = [{"name": n, "size": e["size"]} for n, e in files.items()]
        else:
            console.print(
                f"[yellow]job {job_id} has no {MANIFEST} yet (not finished): its files are not checked"
            )
            items = [
                a
                for a in listing
                if not a["name"].startswith("checkpoints/") and a["name"] not in NOT_IN_MANIFEST
            ]
        if checkpoints:
            items += [a for a in listing if a["name"].startswith("checkpoints/")]
        names = [a["name"] for a in items] + ([MANIFEST] if manifest_raw is not None else [])
        try:
            for name in names:  # joined to dest below: none may leave it, whatever the server sent
                check_name(name)
        except ArtifactKeyError as e:
            console.print(f"[red]the server listed an unsafe artifact name:[/] {e.message}")
            raise typer.Exit(3) from None
        _download_guard(dest, job_id, names, force)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / DOWNLOAD_MARK).write_text(job_id + "\n")
        total = sum(a["size"] for a in items)
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), console=console
        )
        with progress:
            task = progress.add_task("download", total=total)
            for a in items:
                progress.update(task, description=a["name"])
                api.download(job_id, a["name"], dest / a["name"], lambda n: progress.advance(task, n))
    bad = []
    if files is not None:
        bad = verify_files(dest, files)
        # The manifest as it was read before the files, last: a folder that has it is complete.
        (dest / MANIFEST).write_bytes(manifest_raw)
    if checkpoints:
        bad += _verify_checkpoints(dest, [a["name"] for a in items])
    if bad:
        console.print(f"[red]checksum mismatch:[/] {', '.join(bad)}")
        raise typer.Exit(3)
    console.print(f"{len(items)} artifacts, {total:,} bytes -> {dest}")


def _verify_checkpoints(dest: Path, names: list[str]) -> list[str]:
    """Files of the downloaded checkpoint folders that disagree with their folder's manifest."""
    bad = []
    for name in names:
        if name.startswith("checkpoints/") and name.endswith("/" + MANIFEST):
            folder = dest / name.rpartition("/")[0]
            try:
                files = manifest_files(json.loads((folder / MANIFEST).read_text()))
            except (OSError, ValueError):
                bad.append(name)
                continue
            bad += [f"{name.rpartition('/')[0]}/{n}" for n in verify_files(folder, files)]
    return bad


app.add_typer(sweep_app, name="sweep")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except SlimtrainError as e:
        console.print(f"[red]{e.code}:[/] {e.message}")
        sys.exit(3)


if __name__ == "__main__":
    main()
