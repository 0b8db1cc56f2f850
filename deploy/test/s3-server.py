"""The S3 stand-in's server (test only): moto's S3 server, which keeps objects in memory, made to
keep them across a restart the way MinIO keeps them on its volume, so that the deployment test's
`down` / `up` proves artifacts survive, not only job records.

moto's recorder appends every request it serves (method, URL, headers, body) to a file on the
service's volume (MOTO_RECORDER_FILEPATH). At start, before the server reports healthy, this
replays the requests of that file that changed something (PUT, POST, DELETE) in order, against
the fresh server, and keeps only those in the file, so it does not grow with reads from one
restart to the next. A multipart upload gets a new upload id on replay; later requests that name
the recorded id are sent with the new one. A line cut short by a kill (the last one: lines are
written one at a time) is skipped: that request was recorded before it was served, and its
client saw it fail. tests/integration/test_s3_standin.py checks all of this without containers.

Production keeps MinIO, which stores objects as files on its volume and needs none of this."""

import base64
import io
import json
import os
import re
import signal
import sys
import threading
import urllib.parse

import requests

PORT = int(os.environ.get("S3_STANDIN_PORT", "9000"))
BASE = f"http://127.0.0.1:{PORT}"
LOG = os.environ.get("MOTO_RECORDER_FILEPATH", "/data/s3-requests.jsonl")
READY = os.environ.get("S3_STANDIN_READY", "/tmp/s3-ready")  # the healthcheck's: replay done
CHANGES = {"PUT", "POST", "DELETE"}
UPLOAD_ID = re.compile(r"(?<=uploadId=)[^&]+")
STARTS_UPLOAD = re.compile(r"(^|&)uploads(=|&|$)")  # CreateMultipartUpload's query
NOT_REPLAYED = {"host", "content-length", "transfer-encoding"}  # headers the new request sets


def recorded_changes(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    entries, cut = [], 0
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                cut += 1  # cut short by a kill: that request never completed
                continue
            if entry.get("method") in CHANGES:
                entries.append(entry)
    if cut:
        print(f"{cut} recorded request(s) cut short by a kill, skipped", flush=True)
    return entries


def replay(entries: list[dict]) -> list[str]:
    """Sends `entries` to this server in order; returns the ones it refused."""
    refused = []
    uploads: dict[str, str] = {}  # recorded upload id -> this server's
    started: dict[str, str] = {}  # object path -> id of the upload last started on it here
    for e in entries:
        parts = urllib.parse.urlsplit(e["url"])

        def new_id(m: re.Match, path: str = parts.path) -> str:
            old = urllib.parse.unquote(m.group(0))
            if old not in uploads and path in started:
                uploads[old] = started.pop(path)
            return urllib.parse.quote(uploads.get(old, old), safe="")

        query = UPLOAD_ID.sub(new_id, parts.query)
        url = BASE + parts.path + (f"?{query}" if query else "")
        body = base64.b64decode(e["body"]) if e.get("body_encoded") else (e.get("body") or "").encode()
        headers = {k: v for k, v in e["headers"].items() if k.lower() not in NOT_REPLAYED}
        r = requests.request(e["method"], url, headers=headers, data=body, timeout=60)
        if r.status_code >= 300:
            refused.append(f"{e['method']} {parts.path}?{parts.query}: HTTP {r.status_code}")
        if e["method"] == "POST" and STARTS_UPLOAD.search(parts.query):
            created = re.search(r"<UploadId>([^<]+)</UploadId>", r.text)
            if created:
                started[parts.path] = created.group(1)
    return refused


def record_streamed_bodies() -> None:
    """Two gaps in moto's recorder, for this server's clients. It reads a body by its
    Content-Length, and a streamed upload has none: Ray Train's checkpoint uploads (pyarrow's S3
    client, `Transfer-Encoding: chunked`) would be recorded empty; those are read to their end
    here, and moto then reads the same bytes from a buffer. And it appends from every request
    thread at once, so two large bodies' lines would interleave: one thread at a time here."""
    from moto.moto_api import recorder

    record = recorder._record_request
    one_at_a_time = threading.Lock()

    def record_with_streamed_body(request, body=None):
        if body is None and "Content-Length" not in request.headers and request.method in CHANGES:
            body = request.environ["wsgi.input"].read()
            request.environ["wsgi.input"] = io.BytesIO(body)
        with one_at_a_time:
            record(request, body)

    recorder._record_request = record_with_streamed_body


def main() -> int:
    if os.path.exists(READY):
        os.remove(READY)  # a restarted (not recreated) container replays again
    entries = recorded_changes(LOG)
    os.makedirs(os.path.dirname(LOG) or ".", exist_ok=True)
    with open(LOG + ".tmp", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
    os.replace(LOG + ".tmp", LOG)

    # In this process, so that the recorder can be given streamed bodies; recording starts off
    # (MOTO_ENABLE_RECORDING unset): the replayed requests are in the file already.
    os.environ["MOTO_RECORDER_FILEPATH"] = LOG
    os.environ.pop("MOTO_ENABLE_RECORDING", None)
    from moto.server import ThreadedMotoServer

    record_streamed_bodies()
    server = ThreadedMotoServer(ip_address="0.0.0.0", port=PORT, verbose=False)
    server.start()
    for line in replay(entries):
        # the original may have been refused too (a retried upload, say); the bucket checks of
        # the deployment test decide whether anything is missing
        print(f"replay refused: {line}", flush=True)
    requests.post(f"{BASE}/moto-api/recorder/start-recording", timeout=10).raise_for_status()
    open(READY, "w").close()
    print(f"S3 stand-in ready: {len(entries)} recorded requests replayed from {LOG}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
