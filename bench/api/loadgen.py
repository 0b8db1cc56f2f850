"""A small closed-loop HTTP/1.1 load generator: C keep-alive connections, each sending its next
request when the previous answer is complete, for D seconds. Hand-written (raw asyncio streams)
because it must stay cheap on a 2-core machine where it shares the CPUs with the server: an
httpx-based client spends more CPU per request than the server under test. Run as its own
process: `python -m bench.api.loadgen URL PATH --token T [--method POST --body FILE]`; prints
JSON with the count, errors and every latency."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from urllib.parse import urlparse

NONCE = f"{time.time_ns():x}"  # unique Idempotency-Keys per run: every POST creates a job


def build_request(
    method: str, host: str, path: str, token: str, body: bytes | None, idem: str | None
) -> bytes:
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Authorization: Bearer {token}"]
    if idem:
        head.append(f"Idempotency-Key: {idem}")
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + (body or b"")


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def worker(url, path, token, method, body, seconds, lat, errors, unique):
    u = urlparse(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline:
        key = f"{NONCE}-{unique}-{n}" if method == "POST" else None
        req = build_request(method, u.netloc, path, token, body, key)
        t0 = time.perf_counter()
        writer.write(req)
        status = await read_response(reader)
        lat.append(time.perf_counter() - t0)
        if status >= 400:
            errors.append(status)
        n += 1
    writer.close()


async def run(url, path, token, method, body, seconds, connections) -> dict:
    lat: list[float] = []
    errors: list[int] = []
    t0 = time.perf_counter()
    await asyncio.gather(
        *(worker(url, path, token, method, body, seconds, lat, errors, i) for i in range(connections))
    )
    wall = time.perf_counter() - t0
    return {"requests": len(lat), "errors": len(errors), "wall_s": wall, "latencies_s": lat}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("path")
    p.add_argument("--token", required=True)
    p.add_argument("--method", default="GET")
    p.add_argument("--body", help="file with the request body")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--connections", type=int, default=16)
    a = p.parse_args()
    body = Path(a.body).read_bytes() if a.body else None
    print(json.dumps(asyncio.run(run(a.url, a.path, a.token, a.method, body, a.seconds, a.connections))))


if __name__ == "__main__":
    main()
