"""The `slimtrain` command line.

Exit codes: 0 success, 1 the job failed, 2 bad input (spec, arguments), 3 infrastructure error."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from api import render
from service.errors import ArtifactKeyError, ConfigError, SlimtrainError, SpecError, TrainingFailed
from service.spec import JobSpec, json_schema, load_spec_file

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)
out = Console()


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
    from service.settings import get_settings

    settings = get_settings()
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
    target: Annotated[str, typer.Argument(help="A job folder, or a job id in the artifact store.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
):
    """Print a job's compression report."""
    path = Path(target)
    if path.is_dir():
        rpath = path / "report.json"
        if not rpath.is_file():
            console.print(f"[red]{rpath} does not exist")
            raise typer.Exit(2)
        rep = json.loads(rpath.read_text())
    else:
        from service.artifacts import JobArtifacts, open_store
        from service.settings import get_settings

        s = get_settings()
        try:
            rep = JobArtifacts(open_store(s.resolved_artifact_uri, s.s3_endpoint_url), target).get_json(
                "report.json"
            )
        except SlimtrainError as e:
            console.print(f"[red]{e.message}")
            raise typer.Exit(2) from None
    if as_json:
        out.print_json(json.dumps(rep))
    else:
        out.print(render.report_table(rep))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except SlimtrainError as e:
        console.print(f"[red]{e.code}:[/] {e.message}")
        sys.exit(3)


if __name__ == "__main__":
    main()
