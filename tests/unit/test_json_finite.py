"""Metric records are stored with NaN and infinities as null (service/store/repo.py), value by value."""

from __future__ import annotations

import math

import pytest

from service.store.repo import json_finite

INF, NAN = math.inf, math.nan


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (NAN, None),
        (INF, None),
        (-INF, None),
        (0.5, 0.5),
        (-0.0, -0.0),
        (1e308, 1e308),
        (3, 3),
        (True, True),
        (None, None),
        ("NaN", "NaN"),  # a string is what it says
        ([1.0, NAN, [INF, 2]], [1.0, None, [None, 2]]),
        ({"loss": NAN, "deep": {"x": [-INF]}, "ok": 1.5}, {"loss": None, "deep": {"x": [None]}, "ok": 1.5}),
        ({}, {}),
        ([], []),
    ],
)
def test_json_finite(value, stored):
    assert json_finite(value) == stored
