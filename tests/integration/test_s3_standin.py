"""The deployment test's S3 stand-in (deploy/test/s3-server.py) keeps what was written across a
restart, as MinIO does on its volume: `make test-deploy`'s down/up step relies on it, and CI
machines without a container engine still run this. Written with the clients slimtrain uses:
boto3 (the API's store: single puts, multipart, deletes) and pyarrow's S3 filesystem (Ray
Train's checkpoint uploads, streamed with `Transfer-Encoding: chunked`), some at once."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from service.s3_store import S3ArtifactStore, make_client
from tests.plugins.s3 import CREDENTIALS, REGION
from tests.raycluster import free_port

SERVER = Path(__file__).resolve().parents[2] / "deploy" / "test" / "s3-server.py"
MiB = 2**20


@pytest.fixture
def standin(tmp_path):
    port, ready = free_port(), tmp_path / "ready"
    env = {
        **os.environ,
        "MOTO_RECORDER_FILEPATH": str(tmp_path / "s3-requests.jsonl"),
        "S3_STANDIN_PORT": str(port),
        "S3_STANDIN_READY": str(ready),
    }
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        with contextlib.suppress(FileNotFoundError):
            ready.unlink()
        proc = subprocess.Popen(
            [sys.executable, str(SERVER)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        procs.append(proc)
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, f"the stand-in exited with {proc.returncode}"
            assert time.monotonic() < deadline, "the stand-in was not ready within 60 s"
            time.sleep(0.1)
        return proc

    start.endpoint = f"http://127.0.0.1:{port}"
    start.log = Path(env["MOTO_RECORDER_FILEPATH"])
    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _lines_until_ready(server: subprocess.Popen) -> list[str]:
    lines = []
    while not lines or "S3 stand-in ready" not in lines[-1]:
        line = server.stdout.readline()
        assert line, f"the stand-in said {lines} and closed its output"
        lines.append(line)
    return lines


def test_objects_survive_restarts(standin):
    server = standin()
    s3 = make_client(standin.endpoint, REGION, CREDENTIALS)
    s3.create_bucket(Bucket="kept")
    # the filesystem the driver hands Ray Train for its checkpoint uploads
    store = S3ArtifactStore("s3://kept", standin.endpoint, region=REGION, credentials=CREDENTIALS)
    job_root, fs = store.ray_storage("job")
    big = os.urandom(12 * MiB)
    s3.upload_fileobj(
        io.BytesIO(big),
        "kept",
        "job/model.bin",
        Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB),
    )
    s3.put_object(Bucket="kept", Key="job/report.json", Body=b'{"v": 1}')
    s3.put_object(Bucket="kept", Key="job/gone", Body=b"deleted before the restart")
    s3.delete_object(Bucket="kept", Key="job/gone")
    s3.put_object(Bucket="kept", Key="job/report.json", Body=b'{"v": 2}')  # the last write wins
    blobs = {f"job/ckpt/{i}": os.urandom(200_000 + i) for i in range(12)}

    def write(key: str) -> None:
        if int(key.rsplit("/", 1)[1]) % 2:
            s3.put_object(Bucket="kept", Key=key, Body=blobs[key])
        else:
            with fs.open_output_stream(f"{job_root}/{key.removeprefix('job/')}") as f:
                f.write(blobs[key])

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(write, blobs))
    server.kill()
    server.wait()
    with standin.log.open("a") as f:
        f.write('{"method": "PUT", "url": "http://x/kept/job/half')  # a kill mid-record

    def check() -> None:
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="kept", Prefix="job/")["Contents"])
        assert keys == sorted(["job/model.bin", "job/report.json", *blobs])
        got = s3.get_object(Bucket="kept", Key="job/model.bin")["Body"].read()
        assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
        assert s3.get_object(Bucket="kept", Key="job/report.json")["Body"].read() == b'{"v": 2}'
        for key, data in blobs.items():
            assert s3.get_object(Bucket="kept", Key=key)["Body"].read() == data, key

    server = standin()
    said = _lines_until_ready(server)
    assert any("1 recorded request(s) cut short" in line for line in said), said
    assert not any("refused" in line for line in said), said
    check()
    s3.put_object(Bucket="kept", Key="job/after", Body=b"written after a replay")
    server.terminate()  # as `down` stops it
    server.wait(10)
    server = standin()  # replays the compacted log, and what came after
    assert s3.get_object(Bucket="kept", Key="job/after")["Body"].read() == b"written after a replay"
    s3.delete_object(Bucket="kept", Key="job/after")
    check()
