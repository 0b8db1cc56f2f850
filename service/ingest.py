"""Metrics from running drivers into the job store.

The API tails each live job's metric records in the artifact store rather than having drivers
call back into the API: it works the same for a local folder and S3, the driver needs neither a
network path to the API nor an API credential, and since the ingested record count lives in the
job row, an API restart resumes exactly where it stopped (the conditional update also makes a
second API replica harmless).

The driver writes append-only parts named by the sequence number of their first record
(`service.records.part_name`, `workers.metrics_log`), so a tick reads the one part that starts
at the job's stored count, and the next, until there is none: the cost of a tick follows the
new records, not the job's length, and a job with nothing new costs one missed read. A job whose
driver wrote only `metrics.jsonl` (an older driver) is read whole, as before.

With several API processes the leader alone ingests (service/leader.py, `lease`); the
conditional update keeps a record stored once even if a deposed leader's tick overlaps."""

from __future__ import annotations

import json
import logging

from service.artifacts import ArtifactStore, JobArtifacts
from service.errors import ArtifactNotFound, SlimtrainError
from service.leader import Lease
from service.records import METRICS, list_parts, part_name
from service.store.repo import Store

log = logging.getLogger(__name__)


def parse_lines(data: bytes, skip: int, first: int = 0) -> list[dict]:
    """Records of the complete lines after the first `skip`, numbered from `first` (the sequence
    number of the data's first line); a line that is not a JSON object still counts (its number
    is its sequence number) and becomes an `invalid_record` event."""
    lines = data.split(b"\n")[:-1]  # the part after the last newline is not a complete line
    out = []
    for i, raw in enumerate(lines[skip:], start=first + skip):
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
        # Per job, a count where a part this process read ends: when the stored count equals it,
        # a missing next part means nothing new, with no listing.
        self._ends: dict[str, int] = {}
        self._sizes: dict[str, int] = {}  # metrics.jsonl of an older driver: its size last read
        self.lease: Lease | None = None  # None: this process alone ingests

    def tick(self) -> None:
        for job in self.store.ingesting_jobs():
            if self.lease is not None and not self.lease.holds():
                return
            self.ingest_job(job.id, job.metrics_lines)

    def ingest_job(self, job_id: str, have: int | None = None) -> int:
        """Store the job's new metric records; returns how many."""
        if have is None:
            have = self.store.get_job(job_id).metrics_lines
        arts = JobArtifacts(self.artifacts, job_id)
        stored = 0
        while (data := self._read(arts, part_name(have))) is not None:
            records = parse_lines(data, 0, have)
            if not records:
                break
            if not self.store.ingest(job_id, have, records):
                return stored  # another ingester got there first
            have += len(records)
            stored += len(records)
            self._ends[job_id] = have
        if stored or self._ends.get(job_id) == have:
            return stored
        caught = self._catch_up(arts, job_id, have)
        if caught and self._ends.get(job_id) == have + caught:  # parts follow the one caught up
            caught += self.ingest_job(job_id, have + caught)
        return caught

    def _catch_up(self, arts: JobArtifacts, job_id: str, have: int) -> int:
        """No part starts at `have` and this process has not seen one end there: after an API
        restart, `have` is the end of a part (or inside the one a driver made of an older
        driver's metrics.jsonl); with no parts at all, the driver wrote only metrics.jsonl."""
        if have > 0:
            try:
                before = [p for p in list_parts(arts) if p[0] < have]
            except (OSError, SlimtrainError) as e:
                log.warning("listing metrics of %s: %s", job_id, e)
                return 0
            if before:
                first, name = before[-1]
                data = self._read(arts, name)
                if data is None:
                    return 0
                records = parse_lines(data, have - first, first)
                if records and not self.store.ingest(job_id, have, records):
                    return 0
                if first + data.count(b"\n") >= have:
                    self._ends[job_id] = have + len(records)
                    return len(records)
        return self._ingest_whole(arts, job_id, have)

    def _ingest_whole(self, arts: JobArtifacts, job_id: str, have: int) -> int:
        try:
            with arts.open_read(METRICS) as f:
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

    def _read(self, arts: JobArtifacts, name: str) -> bytes | None:
        try:
            return arts.get_bytes(name)
        except ArtifactNotFound:
            return None
        except (OSError, SlimtrainError) as e:
            log.warning("reading metrics of %s: %s", arts.job_id, e)
            return None

    def forget(self, job_id: str) -> None:
        self._ends.pop(job_id, None)
        self._sizes.pop(job_id, None)
