"""The HTTP client of the slimtrain API, as the CLI uses it.

Errors come back typed: `ApiError` for an answer with an error body (4xx: the caller's input,
exit 2 in the CLI; 5xx: the service's problem, exit 3), `Unreachable` when no answer came.
`events` follows a job's SSE stream and reconnects with Last-Event-ID when the connection
drops (an API restart included), so nothing is missed or repeated."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = {"succeeded", "failed", "cancelled"}


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
