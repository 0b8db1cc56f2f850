"""Job identifiers: time-sortable, unguessable, safe as an artifact prefix and a Ray submission id."""

from __future__ import annotations

import secrets
import time


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)
