import math

import pytest

from lmprune.schedules import cubic_ramp, linear_ramp, segmented_warmup_cosine, warmup_cosine


def test_warmup_is_linear_to_peak():
    assert warmup_cosine(0, 1.0, 0.1, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(4, 1.0, 0.1, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(9, 1.0, 0.1, 10, 100) == pytest.approx(1.0)


def test_cosine_reaches_midpoint_and_end():
    assert warmup_cosine(10, 1.0, 0.1, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 1.0, 0.1, 10, 110) == pytest.approx(0.55)
    assert warmup_cosine(110, 1.0, 0.1, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(500, 1.0, 0.1, 10, 110) == pytest.approx(0.1)


def test_cosine_is_monotone_after_warmup():
    lrs = [warmup_cosine(s, 3e-3, 3e-4, 20, 200) for s in range(20, 200)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_no_warmup():
    assert warmup_cosine(0, 2.0, 0.0, 0, 10) == pytest.approx(2.0)


def test_segmented_schedule_rewarms_once_per_segment():
    total = 100
    lrs = [segmented_warmup_cosine(s, 1.0, 0.0, 10, [(0, 60), (60, 40)]) for s in range(total)]
    assert lrs[:60] == [warmup_cosine(s, 1.0, 0.0, 10, 60) for s in range(60)]
    assert lrs[60:] == [warmup_cosine(s, 1.0, 0.0, 10, 40) for s in range(40)]
    rises = [s for s in range(10, total) if lrs[s] > lrs[s - 1] + 1e-12]
    assert rises and min(rises) == 60
    assert segmented_warmup_cosine(30, 1.0, 0.1, 5, [(0, 80)]) == warmup_cosine(30, 1.0, 0.1, 5, 80)


def test_segment_may_continue_a_longer_schedule():
    # oneshot-restarted: the first phase follows the full-run schedule, cut at step 50
    lrs = [segmented_warmup_cosine(s, 1.0, 0.0, 5, [(0, 100), (50, 50)]) for s in range(100)]
    assert lrs[49] == warmup_cosine(49, 1.0, 0.0, 5, 100) and lrs[49] > 0.4
    assert lrs[50] == warmup_cosine(0, 1.0, 0.0, 5, 50)


def test_cubic_ramp_values():
    assert cubic_ramp(9, 10, 20, 0.0, 0.6) == 0.0
    assert cubic_ramp(10, 10, 20, 0.0, 0.6) == pytest.approx(0.0)
    assert cubic_ramp(20, 10, 20, 0.0, 0.6) == pytest.approx(0.6 - 0.6 * 0.5 ** 3)
    assert cubic_ramp(30, 10, 20, 0.0, 0.6) == pytest.approx(0.6)
    assert cubic_ramp(99, 10, 20, 0.0, 0.6) == pytest.approx(0.6)
    values = [cubic_ramp(s, 10, 20, 0.0, 0.6) for s in range(0, 40)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_linear_ramp():
    assert linear_ramp(0, 10, 10, 1.0, 0.0) == 1.0
    assert linear_ramp(15, 10, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert linear_ramp(25, 10, 10, 1.0, 0.0) == 0.0
    assert math.isclose(linear_ramp(12, 10, 0, 1.0, 0.0), 0.0)
