"""What every `slimtrain` command module shares: the consoles, the --url/--token/--json options,
the settings (exit 2 on a malformed variable) and an API client whose errors become messages and
exit codes. Its own module so `api.cli` and the command groups built beside it (`api.sweep_cli`)
import it without importing each other (a cycle under `python -m api.cli`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from api import render
from api.client import (
    ApiError,
    Client,
    ConfigFileError,
    Credentials,
    NoToken,
    Unreachable,
    resolve_credentials,
)
from service.errors import SpecError

console = Console(stderr=True)
out = Console()

# Not typer's envvar: the URL and the token are looked up in one place, in a documented order
# (api.client.resolve_credentials), so a missing token can be explained.
Url = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="The slimtrain API (default: SLIMTRAIN_URL, else the config file's url, else "
        "http://127.0.0.1:8000).",
        show_default=False,
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="API token (default: SLIMTRAIN_TOKEN, else the config file's token, "
        "~/.config/slimtrain/config.toml, else the one `slimtrain serve` keeps in the data dir).",
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


def _data_dir_token() -> tuple[str | None, Path]:
    from service.auth import local_token, token_file

    settings = _settings()
    return local_token(settings), token_file(settings)


def _credentials(url: str | None, token: str | None) -> Credentials:
    """URL and token in the documented order (api.client.resolve_credentials), or exit 2."""
    try:
        return resolve_credentials(url, token, data_dir_token=_data_dir_token)
    except (ConfigFileError, NoToken) as e:
        console.print(f"[red]{e}", soft_wrap=True)
        raise typer.Exit(2) from None


@contextlib.contextmanager
def _api(url: str | None, token: str | None, hint: str | None = None) -> Iterator[Client]:
    """A client of the API; its errors become messages and exit codes, never tracebacks.
    `hint` follows a 404 or an unreachable API (e.g. that no local folder has that name)."""
    creds = _credentials(url, token)
    client = Client(creds.url, creds.token)
    try:
        yield client
    except ApiError as e:
        if e.fields:
            # Not only specs come back with fields (a dataset shard, a sweep, a model upload):
            # the server's own message is the title.
            console.print(render.spec_errors(SpecError(e.message, e.fields), title=f"Refused: {e.message}"))
        else:
            console.print(f"[red]{e.code}:[/] {e.message}" + (f" {hint}" if hint and e.status == 404 else ""))
        if e.status == 401:
            console.print(
                f"{creds.url} refused the token from {creds.source}: pass --token or set SLIMTRAIN_TOKEN "
                "(the token `slimtrain serve` printed)"
            )
        raise typer.Exit(2 if e.status < 500 else 3) from None
    except Unreachable as e:
        console.print(f"[red]unreachable:[/] {e}" + (f" {hint}" if hint else ""))
        raise typer.Exit(3) from None
    finally:
        client.close()
