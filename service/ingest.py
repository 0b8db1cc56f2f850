"""Metrics from running drivers into the job store.

The API tails each live job's `<job>/metrics.jsonl` in the artifact store (the driver rewrites it
at most every second, atomically) rather than having drivers call back into the API: it works
the same for a local folder and S3, the driver needs neither a network path to the API nor an
API credential, and since the ingested line count lives in the job row, an API restart resumes
exactly where it stopped (the conditional update also makes a second API replica harmless)."""

from __future__ import annotations

import json
import logging

from service.artifacts import ArtifactStore, JobArtifacts
from service.errors import ArtifactNotFound, SlimtrainError
from service.store.repo import Store

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"


def parse_lines(data: bytes, skip: int) -> list[dict]:
    """Records of the complete lines after the first `skip`; a line that is not a JSON object
    still counts (its number is its sequence number) and becomes an `invalid_record` event."""
    lines = data.split(b"\n")[:-1]  # the part after the last newline is not a complete line
    out = []
    for i, raw in enumerate(lines[skip:], start=skip):
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            rec = {"kind": "event", "event": "invalid_record", "line": i}
        out.append(rec)
    return out


class Ingester:
    def __init__(self, store: Store, artifacts: ArtifactStore):
        self.store, self.artifacts = store, artifacts
        self._sizes: dict[str, int] = {}

    def tick(self) -> None:
        for job in self.store.ingesting_jobs():
            self.ingest_job(job.id, job.metrics_lines)

    def ingest_job(self, job_id: str, have: int | None = None) -> int:
        """Store the job's new metric records; returns how many."""
        if have is None:
            have = self.store.get_job(job_id).metrics_lines
        try:
            with JobArtifacts(self.artifacts, job_id).open_read(METRICS) as f:
                if f.seekable():
                    size = f.seek(0, 2)
                    if self._sizes.get(job_id) == size:
                        return 0
                    f.seek(0)
                else:
                    size = None
                data = f.read()
        except ArtifactNotFound:
            return 0
        except (OSError, SlimtrainError) as e:
            log.warning("reading metrics of %s: %s", job_id, e)
            return 0
        total = data.count(b"\n")
        if total < have:
            log.warning("metrics of %s shrank to %d lines (%d ingested); waiting", job_id, total, have)
            return 0
        records = parse_lines(data, have)
        if records and not self.store.ingest(job_id, have, records):
            return 0  # another ingester got there first
        if size is not None:
            self._sizes[job_id] = size
        return len(records)

    def forget(self, job_id: str) -> None:
        self._sizes.pop(job_id, None)
