"""Every schedule, value by value, before start, inside, at and after the end."""

import pytest

from service.spec import PruningSpec
from workers.compression import schedules as S


def cfg(**kw):
    base = dict(
        schedule="cubic", initial_sparsity=0.0, final_sparsity=0.9, start_step=100, end_step=500, frequency=50
    )
    base.update(kw)
    return PruningSpec(**base)


@pytest.mark.parametrize(
    "step,expected",
    [
        (0, 0.0),
        (99, 0.0),
        (100, 0.0),  # s_f + (s_i - s_f) * 1^3 = s_i
        (200, 0.9 + (0.0 - 0.9) * (1 - 100 / 400) ** 3),
        (300, 0.9 - 0.9 * 0.5**3),
        (400, 0.9 - 0.9 * 0.25**3),
        (500, 0.9),
        (501, 0.9),
        (10_000, 0.9),
    ],
)
def test_cubic_matches_zhu_gupta(step, expected):
    assert S.target_sparsity(cfg(), step) == pytest.approx(expected, abs=1e-12)


def test_cubic_with_initial_sparsity():
    c = cfg(initial_sparsity=0.2, final_sparsity=0.8)
    assert S.target_sparsity(c, 50) == 0.0
    assert S.target_sparsity(c, 100) == pytest.approx(0.2)
    assert S.target_sparsity(c, 300) == pytest.approx(0.8 + (0.2 - 0.8) * 0.125)
    assert S.target_sparsity(c, 500) == pytest.approx(0.8)


@pytest.mark.parametrize("step,expected", [(99, 0.0), (100, 0.1), (300, 0.5), (500, 0.9), (900, 0.9)])
def test_linear(step, expected):
    c = cfg(schedule="linear", initial_sparsity=0.1)
    assert S.target_sparsity(c, step) == pytest.approx(expected)


@pytest.mark.parametrize("step,expected", [(0, 0.0), (99, 0.0), (100, 0.9), (101, 0.9), (5000, 0.9)])
def test_oneshot(step, expected):
    assert S.target_sparsity(cfg(schedule="oneshot"), step) == expected


@pytest.mark.parametrize(
    "step,expected", [(0, 0.0), (100, 0.0), (300, 2.0 * (1 - 0.5**3)), (500, 2.0), (800, 2.0)]
)
def test_threshold_theta_ramps_cubically(step, expected):
    c = cfg(schedule="threshold", threshold=2.0, initial_sparsity=0.0, final_sparsity=0.0)
    assert S.threshold_at(c, step) == pytest.approx(expected)


def test_update_steps():
    c = cfg(end_step=520)
    updates = [t for t in range(0, 700) if S.is_update_step(c, t)]
    assert updates == [100, 150, 200, 250, 300, 350, 400, 450, 500, 520]
    assert [t for t in range(0, 700) if S.is_update_step(cfg(schedule="oneshot"), t)] == [100]


def test_scheduled_sparsity_holds_last_update_value():
    c = cfg()
    assert S.scheduled_sparsity(c, 99) == 0.0
    assert S.scheduled_sparsity(c, 149) == S.target_sparsity(c, 100)
    assert S.scheduled_sparsity(c, 150) == S.target_sparsity(c, 150)
    assert S.scheduled_sparsity(c, 499) == S.target_sparsity(c, 450)
    assert S.scheduled_sparsity(c, 10_000) == pytest.approx(0.9)


def test_update_steps_within_the_run():
    assert S.update_steps(cfg(), 1000) == [100, 150, 200, 250, 300, 350, 400, 450, 500]
    assert S.update_steps(cfg(end_step=480), 1000)[-2:] == [450, 480]  # the end step always counts
    assert S.update_steps(cfg(), 260) == [100, 150, 200, 250]  # a run that stops early
    assert S.update_steps(cfg(), 500)[-1] == 500  # made after the last step: the exported model's
    assert S.update_steps(cfg(schedule="oneshot"), 1000) == [100]
    assert S.update_steps(cfg(schedule="oneshot"), 99) == []


def test_target_curve_is_the_staircase_of_the_masks_in_force():
    c = cfg()
    curve = S.target_curve(c, 1000)
    assert curve[0] == (0, 0.0) and curve[-1] == (1000, 0.9)
    # an update at step u trains from step u on: a record at u + 1 steps done measures it
    assert [s for s, _ in curve] == [0, 101, 151, 201, 251, 301, 351, 401, 451, 501, 1000]
    for done, target in curve[1:]:
        assert target == S.scheduled_sparsity(c, done - 1)
    assert S.target_curve(cfg(schedule="threshold", threshold=1.0), 1000) is None
    assert S.target_curve(cfg(schedule="oneshot"), 1000) == [(0, 0.0), (101, 0.9), (1000, 0.9)]
    # a schedule ending at the last step: that update, made after it, is the last corner
    ends = S.target_curve(cfg(end_step=500, frequency=100), 500)
    assert ends == [(0, 0.0)] + [(u + 1, S.target_sparsity(c, u)) for u in (100, 200, 300, 400)] + [
        (500, 0.9)
    ]


def test_target_curve_thins_dense_schedules_and_keeps_the_end():
    c = cfg(start_step=0, end_step=10_000, frequency=1)
    curve = S.target_curve(c, 20_000, max_points=100)
    assert len(curve) <= 103
    assert curve[-2] == (10_001, 0.9) and curve[-1] == (20_000, 0.9)
    assert all(a[0] < b[0] for a, b in zip(curve, curve[1:], strict=False))
    assert all(t == S.target_sparsity(c, s - 1) for s, t in curve[1:-1])
