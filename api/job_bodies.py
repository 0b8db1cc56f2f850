"""Response bodies of `GET /v1/jobs/{id}` and `GET /v1/jobs`, rendered once per version of a
job's row; and of `GET /v1/jobs/{id}/metrics`, rendered from rows.

A body is a pure function of the job's row, so it is kept beside the row it was rendered from
and reused while the database still holds that row to the byte. The row is read on every
request (service/store/job_rows.py) and compared whole: nothing is trusted by age, and any
change, whoever made it (this process, another replica, the leader's loops), shows in the next
answer. The bytes are those FastAPI renders for the `JobOut` response model (pydantic's JSON of
the validated model), so a client cannot tell a reused body from a fresh one."""

from __future__ import annotations

import json
from collections import OrderedDict

from fastapi import Response
from pydantic import TypeAdapter

from api.routes.schemas import JobOut, MetricPage
from service.store.job_rows import JobRow
from service.store.repo import Page

_JOB = TypeAdapter(JobOut)
_CURSOR = TypeAdapter(str | None)
_METRICS = TypeAdapter(MetricPage)
JSON = "application/json"


class JobBodies:
    """The last body of up to `size` jobs (least recently served dropped first). Used from the
    event loop's thread only."""

    def __init__(self, size: int = 4096):
        self.size = size
        self._cache: OrderedDict[str, tuple[tuple, bytes]] = OrderedDict()
        self.hits = self.misses = 0

    def body(self, row: JobRow) -> bytes:
        hit = self._cache.get(row.id)
        if hit is not None and hit[0] == row.values:
            self._cache.move_to_end(row.id)
            self.hits += 1
            return hit[1]
        self.misses += 1
        # As FastAPI answers for response_model=JobOut: validate, then pydantic's JSON.
        body = _JOB.dump_json(_JOB.validate_python(JobOut.of(row.job())), by_alias=True)
        self._cache[row.id] = (row.values, body)
        self._cache.move_to_end(row.id)
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return body

    def job(self, row: JobRow) -> Response:
        return Response(self.body(row), media_type=JSON)

    def page(self, page: Page) -> Response:
        """A `JobPage` of rows, the same bytes as pydantic's JSON of the model."""
        items = b",".join(self.body(r) for r in page.items)
        cursor = _CURSOR.dump_json(page.next_cursor)
        return Response(b'{"items":[' + items + b'],"next_cursor":' + cursor + b"}", media_type=JSON)


def metric_page(page: Page) -> Response:
    """A `MetricPage` of metric rows (service/store/job_rows.py: MetricRows), validated and
    rendered as FastAPI renders the model (so NaN and infinities in a record become null)."""
    items = [{"seq": q, "kind": k, "step": st, "data": json.loads(d)} for q, k, st, d in page.items]
    model = _METRICS.validate_python({"items": items, "next_cursor": page.next_cursor})
    return Response(_METRICS.dump_json(model, by_alias=True), media_type=JSON)
