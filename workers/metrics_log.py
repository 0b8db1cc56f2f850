"""The driver's side of the metrics stream: records into append-only parts of the artifact store.

Object stores have no append, and rewriting one growing `metrics.jsonl` every second made a
long job's writes (and the API's reads) grow with its length. Instead each flush writes the
records added since the last one as a new part, `metrics/part-<first seq>.jsonl`, written once
(`service.records.part_name`): a flush costs what the new records cost, and the API reads each
part once, from where it stopped. `close()` writes the whole series as `metrics.jsonl`, the
artifact, when the driver ends.

A driver that starts on a job with records (a resubmitted attempt, as its checkpoints say)
continues the series after the last record written: the API has stored records by sequence
number, and earlier attempts' records belong to the job's series. Records before a checkpoint
are in a part before the checkpoint is written (`workers.session.RaySession.save` waits for the
flush), so a resumed attempt neither loses nor repeats them."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator

from service.artifacts import JobArtifacts
from service.errors import ArtifactNotFound
from service.records import METRICS, list_parts, part_name

log = logging.getLogger(__name__)


def decoded(records: Iterable[str | dict]) -> Iterator[dict]:
    """The records among JSON lines (or records already decoded), skipping a line that is not a
    JSON object: a torn last line of a driver that crashed mid-write, or one the API has
    already reported as an `invalid_record` event (service/ingest.py)."""
    for rec in records:
        if isinstance(rec, str):
            try:
                rec = json.loads(rec)
            except ValueError:
                continue
        if isinstance(rec, dict):
            yield rec


def load_series(arts: JobArtifacts) -> tuple[list[str], bool]:
    """The job's records written so far, as JSON lines in sequence order, and whether they are
    in parts (else, a job an older driver began, in the single `metrics.jsonl`). Parts after a
    gap are left out: the API cannot read past the gap either, and the next part fills it."""
    lines: list[str] = []
    for first, name in list_parts(arts):
        if first > len(lines):
            log.warning("metrics of %s: no part holds record %d; continuing from it", arts.job_id, len(lines))
            break
        part = arts.get_bytes(name).decode().splitlines()
        # A part starting before the end (two drivers of one job at once): the first one stands.
        lines.extend(part[len(lines) - first :])
    if lines:
        return lines, True
    try:
        return arts.get_bytes(METRICS).decode().splitlines(), False
    except ArtifactNotFound:
        return [], False


class MetricsLog:
    """Records added with `add`, written out as a new part at most every `interval` seconds (at
    once with `flush(force=True)`), and as `metrics.jsonl` by `close`."""

    def __init__(self, arts: JobArtifacts, interval: float = 1.0):
        self.arts, self.interval = arts, interval
        self.lines, in_parts = load_series(arts)
        self.written = len(self.lines)  # records already in parts
        self.last = 0.0
        self._whole = -1  # records in the metrics.jsonl this driver wrote last
        if self.lines and not in_parts:
            # The series of an older driver, from metrics.jsonl alone: it becomes the first
            # part, so the API finds every record in parts from here on.
            self.written = 0
            self.flush(force=True)

    @property
    def dirty(self) -> bool:
        return len(self.lines) > self.written

    def add(self, record: dict) -> None:
        self.lines.append(json.dumps(record, sort_keys=True))

    def flush(self, force: bool = False) -> None:
        if self.dirty and (force or time.monotonic() - self.last >= self.interval):
            new = self.lines[self.written :]
            self.arts.put_bytes(part_name(self.written), ("\n".join(new) + "\n").encode())
            self.written = len(self.lines)
            self.last = time.monotonic()

    def close(self) -> None:
        """Write what is pending, then the whole series as metrics.jsonl (once per driver: again
        only if records came after)."""
        self.flush(force=True)
        if self._whole != len(self.lines):
            self.arts.put_bytes(METRICS, "".join(line + "\n" for line in self.lines).encode())
            self._whole = len(self.lines)
