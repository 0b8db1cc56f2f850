"""service.store.db.unavailable, value by value: which database errors are an outage the API
answers with 503 (api/errors.py), and which are faults of ours (500)."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
from psycopg_pool import PoolTimeout
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from service.store.db import unavailable


def wrapped(cls, orig, invalidated=False):
    return cls("SELECT 1", {}, orig, connection_invalidated=invalidated)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (PoolTimeout("couldn't get a connection after 3.00 sec"), True),
        (psycopg.OperationalError("connection refused"), True),
        (psycopg.errors.AdminShutdown("terminating connection"), True),
        (wrapped(OperationalError, psycopg.OperationalError("connection refused")), True),
        (wrapped(OperationalError, sqlite3.OperationalError("database is locked")), True),
        (wrapped(OperationalError, sqlite3.OperationalError("no such table: jobs")), False),
        (sqlite3.OperationalError("near 'SELEC': syntax error"), False),
        (wrapped(ProgrammingError, psycopg.ProgrammingError("syntax error"), invalidated=True), True),
        (wrapped(IntegrityError, psycopg.errors.UniqueViolation("duplicate key")), False),
        (psycopg.errors.UniqueViolation("duplicate key"), False),
        (ValueError("not a database error"), False),
    ],
)
def test_which_errors_are_an_outage(exc, expected):
    assert unavailable(exc) is expected
