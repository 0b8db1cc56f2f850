"""The HTTP client of the slimtrain API, as the CLI uses it.

Errors come back typed: `ApiError` for an answer with an error body (4xx: the caller's input,
exit 2 in the CLI; 5xx: the service's problem, exit 3), `Unreachable` when no answer came.
`events` follows a job's SSE stream and reconnects with Last-Event-ID when the connection
drops (an API restart included), so nothing is missed or repeated."""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = {"succeeded", "failed", "cancelled"}
# The first line of a config file `slimtrain serve` wrote: while it is there, serve may replace
# the file when it creates a new token; a user who takes the file over deletes the line.
SERVE_MARK = "# written by `slimtrain serve`; delete this line to keep serve from replacing the file"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ConfigFileError(Exception):
    """The user config file exists but cannot be used; the message names it."""


def config_path(environ: Mapping[str, str] = os.environ) -> Path:
    """`$XDG_CONFIG_HOME/slimtrain/config.toml`, else `~/.config/slimtrain/config.toml` (the XDG
    base directory rules: a relative XDG_CONFIG_HOME is ignored)."""
    base = environ.get("XDG_CONFIG_HOME", "")
    root = (
        Path(base)
        if base and Path(base).is_absolute()
        else Path(environ.get("HOME") or Path.home()) / ".config"
    )
    return root / "slimtrain" / "config.toml"


def read_config(path: Path) -> dict[str, str]:
    """`url` and `token` of the config file ({} when there is none)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigFileError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"{path}: not valid TOML ({e})") from None
    out = {}
    for key in ("url", "token"):
        if key in doc:
            if not isinstance(doc[key], str) or not doc[key].strip():
                raise ConfigFileError(f"{path}: {key} must be a non-empty string")
            out[key] = doc[key].strip()
    return out


def write_config(path: Path, url: str, token: str) -> bool:
    """Write url and token for the CLI (mode 0600), unless the file is the user's own: it exists
    and does not start with SERVE_MARK. Returns whether it was written."""
    try:
        if not path.read_text().startswith(SERVE_MARK):
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # json.dumps of a str is a valid TOML basic string (same escapes, \uXXXX included)
    body = f"{SERVE_MARK}\nurl = {json.dumps(url)}\ntoken = {json.dumps(token)}\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(body)
    os.replace(tmp, path)  # never a half-written file, never readable by others
    return True


@dataclass(frozen=True)
class Credentials:
    url: str
    token: str
    source: str  # where the token came from, for messages


class NoToken(Exception):
    """No token in any of the places looked; the message lists them."""


def _same_server(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def resolve_credentials(
    url: str | None,
    token: str | None,
    environ: Mapping[str, str] = os.environ,
    data_dir_token: Callable[[], tuple[str | None, Path]] | None = None,
) -> Credentials:
    """The API's URL and token. URL: --url, SLIMTRAIN_URL, the config file's url, the default.
    Token: --token, SLIMTRAIN_TOKEN, the config file's token, the data dir's api-tokens (the
    token `slimtrain serve` created, for a CLI on the server's machine). A stored token is only
    sent where it belongs: the config file's to its own url, the data dir's to loopback."""
    path = config_path(environ)
    config = read_config(path)
    url = url or environ.get("SLIMTRAIN_URL") or config.get("url") or DEFAULT_URL
    if token:
        return Credentials(url, token, "--token")
    if environ.get("SLIMTRAIN_TOKEN"):
        return Credentials(url, environ["SLIMTRAIN_TOKEN"], "SLIMTRAIN_TOKEN")
    looked = ["--token", "SLIMTRAIN_TOKEN"]
    if "token" in config and _same_server(config.get("url", url), url):
        return Credentials(url, config["token"], str(path))
    looked.append(
        f"{path} (its token is for {config['url']})" if "token" in config else f"{path} (no token there)"
    )
    if data_dir_token is not None:
        found, where = data_dir_token()
        if found and urlparse(url).hostname in _LOOPBACK:
            return Credentials(url, found, str(where))
        looked.append(f"{where} (only for a server on this machine)" if found else f"{where} (none there)")
    raise NoToken(
        f"no API token for {url}; looked in: " + ", ".join(looked) + ". Pass --token, set SLIMTRAIN_TOKEN, "
        f'or put token = "..." (and url) in {path}; `slimtrain serve` writes that file on its first start.'
    )


@dataclass
class ApiError(Exception):
    status: int
    code: str
    message: str
    fields: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class Unreachable(Exception):
    pass


@dataclass(frozen=True)
class Event:
    id: int
    type: str
    data: dict


class Client:
    def __init__(self, url: str, token: str | None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code < 400:
            return r
        try:
            err = r.json()["error"]
            raise ApiError(r.status_code, err["code"], err["message"], err.get("fields") or [])
        except (ValueError, KeyError, TypeError):
            raise ApiError(r.status_code, "http_error", f"HTTP {r.status_code}: {r.text[:300]}") from None

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            return self._check(self.http.request(method, path, **kw))
        except httpx.TransportError as e:
            raise Unreachable(f"cannot reach the slimtrain API at {self.url}: {e}") from None

    # --- jobs ------------------------------------------------------------------------------------

    def submit(self, spec: dict, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=spec, headers=headers).json()

    def jobs(self, states: list[str] | None = None, limit: int = 50, cursor: str | None = None) -> dict:
        params: list[tuple[str, str]] = [("limit", str(limit))]
        params += [("state", s) for s in states or []]
        if cursor:
            params.append(("cursor", cursor))
        return self._request("GET", "/v1/jobs", params=params).json()

    def job(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def report(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}/report").json()

    # --- sweeps ----------------------------------------------------------------------------------

    def submit_sweep(self, request: dict) -> dict:
        return self._request("POST", "/v1/sweeps", json=request).json()

    def sweep(self, sweep_id: str, max_accuracy_drop: float | None = None) -> dict:
        params = {"max_accuracy_drop": max_accuracy_drop} if max_accuracy_drop is not None else {}
        return self._request("GET", f"/v1/sweeps/{sweep_id}", params=params).json()

    def sweeps(self) -> dict:
        return self._request("GET", "/v1/sweeps").json()

    def cancel_sweep(self, sweep_id: str) -> dict:
        return self._request("POST", f"/v1/sweeps/{sweep_id}/cancel").json()

    def metrics(self, job_id: str, kinds: list[str] | None = None) -> list[dict]:
        items, cursor = [], None
        while True:
            params: list[tuple[str, str]] = [("kind", k) for k in kinds or []]
            if cursor:
                params.append(("cursor", cursor))
            page = self._request("GET", f"/v1/jobs/{job_id}/metrics", params=params).json()
            items += page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return items

    def logs(self, job_id: str) -> str:
        return self._request("GET", f"/v1/jobs/{job_id}/logs").text

    def follow_logs(self, job_id: str) -> Iterator[str]:
        try:
            with self.http.stream(
                "GET",
                f"/v1/jobs/{job_id}/logs",
                params={"follow": "true"},
                timeout=httpx.Timeout(30, read=None),
            ) as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                yield from r.iter_text()
        except httpx.TransportError as e:
            raise Unreachable(f"log stream from {self.url} broke: {e}") from None

    # --- artifacts -------------------------------------------------------------------------------

    def artifacts(self, job_id: str, prefix: str = "") -> list[dict]:
        items, cursor = [], None
        while True:
            params = {"prefix": prefix, **({"cursor": cursor} if cursor else {})}
            page = self._request("GET", f"/v1/jobs/{job_id}/artifacts", params=params).json()
            items += page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return items

    def artifact_bytes(self, job_id: str, name: str) -> bytes:
        """A small artifact (a manifest, a report) in memory."""
        return self._request("GET", f"/v1/jobs/{job_id}/artifacts/{name}").content

    def download(self, job_id: str, name: str, dest: Path, on_bytes=None) -> Path:
        """Stream one artifact to `dest` (written to a temporary name, then renamed)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                with open(part, "wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
                        if on_bytes:
                            on_bytes(len(chunk))
        except httpx.TransportError as e:
            part.unlink(missing_ok=True)
            raise Unreachable(f"download of {name} broke: {e}") from None
        part.replace(dest)
        return dest

    # --- events ----------------------------------------------------------------------------------

    def events(self, job_id: str, after: int = 0, give_up_after: float = 120.0) -> Iterator[Event]:
        """The job's events until its final state, reconnecting (with the last id seen) while
        the API is unreachable for less than `give_up_after` seconds."""
        last, down_since = after, None
        while True:
            try:
                with self.http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers={"Last-Event-ID": str(last)},
                    timeout=httpx.Timeout(30, read=60),
                ) as r:
                    if r.status_code >= 400:
                        r.read()
                        self._check(r)
                    down_since = None
                    for ev in parse_sse(r.iter_lines()):
                        last = ev.id
                        yield ev
                        if ev.type == "state" and ev.data.get("state") in TERMINAL:
                            return
            except httpx.TransportError:
                pass
            except ApiError as e:
                if e.status < 500:
                    raise
            now = time.monotonic()
            down_since = down_since or now
            if now - down_since > give_up_after:
                raise Unreachable(f"lost the event stream of {job_id} at {self.url} for {give_up_after:.0f}s")
            time.sleep(1.0)

    # --- models (weights for model.init) -----------------------------------------------------------

    def push(self, kind: str, path: Path, name: str, on_bytes=None, params: dict | None = None) -> dict:
        """Upload a file as the tenant's `kind` (models: safetensors; datasets) `name`, streamed
        from disk (no time limit on the body: a large file takes what it takes)."""
        size = path.stat().st_size

        def chunks():
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk
                    if on_bytes:
                        on_bytes(len(chunk))

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        # The answer comes once the server has checked and stored the whole file.
        timeout = httpx.Timeout(self.http.timeout.connect, read=600.0, write=None, pool=None)
        params = {k: v for k, v in (params or {}).items() if v is not None}
        return self._request(
            "PUT", f"/v1/{kind}/{name}", content=chunks(), headers=headers, timeout=timeout, params=params
        ).json()

    def list_uploads(self, kind: str) -> list[dict]:
        return self._request("GET", f"/v1/{kind}").json()["items"]

    def delete_upload(self, kind: str, name: str) -> None:
        self._request("DELETE", f"/v1/{kind}/{name}")


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Server-sent events from a line iterator (comments and pings are skipped)."""
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in lines:
        if line == "":
            if data and "id" in fields:
                yield Event(int(fields["id"]), fields.get("event", "message"), json.loads("\n".join(data)))
            fields, data = {}, []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "data":
            data.append(value)
        else:
            fields[key] = value
