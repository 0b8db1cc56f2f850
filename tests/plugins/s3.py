"""A real S3-protocol server on loopback for the tests: moto's standalone server, in its own
process on a free port, for the whole session. Each test gets its own fresh bucket.

The credentials are moto's fakes. They are handed to stores explicitly, and to subprocesses
through `env`; a test sets them in its own environment only where the code under test reads
the environment (monkeypatched). The Ray cluster never sees them: Ray workers must get them
through the job's config, so a test that relied on ambient state would fail."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.s3_store import S3ArtifactStore, S3Credentials, make_client
from tests.raycluster import free_port

CREDENTIALS = S3Credentials("slimtrain-test-key", "slimtrain-test-secret")
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint_url: str
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        """What a subprocess (or a monkeypatched environment) needs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": CREDENTIALS.access_key,
            "AWS_SECRET_ACCESS_KEY": CREDENTIALS.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            # Keep a developer's own ~/.aws out of the tests.
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "SLIMTRAIN_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self):
        return make_client(self.endpoint_url, REGION, CREDENTIALS)

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def store(self, bucket: str, prefix: str = "") -> S3ArtifactStore:
        uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        return S3ArtifactStore(uri, self.endpoint_url, region=REGION, credentials=CREDENTIALS)


def _wait_listening(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"moto_server did not listen on port {port} within {timeout}s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_listening(port, proc, log)
        yield S3Server(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the session's S3 server."""
    return s3_server.new_bucket()
