import math

import pytest

from service.spec import TrainSpec
from workers.optim import lr_at


@pytest.mark.parametrize("step", [0, 10, 99])
def test_constant(step):
    assert lr_at(TrainSpec(lr=0.1, lr_schedule="constant"), step, 100) == 0.1


@pytest.mark.parametrize(
    "step,expected", [(0, 0.1), (50, 0.05), (100, 0.0), (25, 0.05 * (1 + math.cos(math.pi / 4)))]
)
def test_cosine(step, expected):
    assert lr_at(TrainSpec(lr=0.1, lr_schedule="cosine"), step, 100) == pytest.approx(expected)


def test_warmup_then_cosine():
    t = TrainSpec(lr=0.1, lr_schedule="cosine", warmup_steps=10)
    assert lr_at(t, 0, 110) == pytest.approx(0.01)
    assert lr_at(t, 9, 110) == pytest.approx(0.1)
    assert lr_at(t, 10, 110) == pytest.approx(0.1)
    assert lr_at(t, 60, 110) == pytest.approx(0.05)


@pytest.mark.parametrize("step,expected", [(0, 0.1), (29, 0.1), (30, 0.01), (65, 0.001)])
def test_step(step, expected):
    assert lr_at(TrainSpec(lr=0.1, lr_schedule="step", lr_step_size=30), step, 90) == pytest.approx(expected)


def test_step_default_size_is_a_third():
    t = TrainSpec(lr=1.0, lr_schedule="step", lr_gamma=0.5)
    assert lr_at(t, 32, 99) == 1.0 and lr_at(t, 33, 99) == 0.5
