"""The learning-rate multiplier: linear warmup over ceil(total * ratio) steps, then linear decay to 0."""

from __future__ import annotations

import pytest

from umtam.train import warmup_then_linear_decay


def multipliers(total_steps: int, warmup_ratio: float, steps: int | None = None) -> list[float]:
    schedule = warmup_then_linear_decay(total_steps, warmup_ratio)
    return [schedule(step) for step in range(total_steps if steps is None else steps)]


def test_two_warmup_steps_then_decay_by_an_eighth_per_step():
    # 10 steps, ratio 0.2: warmup 2 steps (1/2, 2/2), then (10 - step) / 8
    assert multipliers(10, 0.2) == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]


def test_a_partial_warmup_step_rounds_up():
    # 10 * 0.25 = 2.5 -> 3 warmup steps (1/3, 2/3, 3/3), then (10 - step) / 7
    assert multipliers(10, 0.25) == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7])
    # the default ratio 0.06 on a 10-step run still warms up for one step: 10 * 0.06 = 0.6 -> 1
    assert multipliers(10, 0.06)[:3] == pytest.approx([1.0, 1.0, 8 / 9])


def test_no_warmup_starts_at_the_peak():
    assert multipliers(4, 0.0) == [1.0, 0.75, 0.5, 0.25]


def test_all_warmup_never_decays():
    assert multipliers(4, 1.0) == [0.25, 0.5, 0.75, 1.0]


def test_steps_past_the_end_stay_at_zero():
    # a resumed run or an epoch's extra batch must not turn the rate negative
    assert multipliers(10, 0.2, steps=13)[9:] == [0.125, 0.0, 0.0, 0.0]
