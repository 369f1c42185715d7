"""The pure local-training schedule (uniflow_cli.schedule): hand-computed values, no model, no torch."""

from __future__ import annotations

import math

import pytest

from uniflow_cli.errors import ConfigError, UsageError
from uniflow_cli.schedule import lr_factor, mixed_seed, stage_plan, total_steps_for, warmup_steps
from uniflow_cli.settings import TrainSettings


# ---------------------------------------------------------------------------------------------- learning rate
def test_warm_up_then_linear_decay_by_hand():
    # 10 steps, warmup_ratio 0.25 → ⌊2.5⌋ = 2 warm-up steps: 1/3, 2/3, then (10 − s) / 8 for s = 2..9.
    steps = 10
    warmup = warmup_steps(TrainSettings(steps=steps, warmup_ratio=0.25), steps)
    assert warmup == 2
    factors = [lr_factor(s, steps, warmup) for s in range(steps)]
    expected = [1 / 3, 2 / 3, 8 / 8, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]
    assert factors == pytest.approx(expected)


def test_no_warm_up_decays_from_one_and_never_reaches_zero():
    assert warmup_steps(TrainSettings(steps=4, warmup_ratio=0.0), 4) == 0
    assert [lr_factor(s, 4, 0) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_default_warm_up_of_twenty_steps():
    # The default warmup_ratio 0.1 of 20 steps: 2 warm-up steps, the peak at step 2, 1/18 on the last one.
    cfg = TrainSettings()
    warmup = warmup_steps(cfg, 20)
    assert warmup == 2
    assert lr_factor(0, 20, warmup) == pytest.approx(1 / 3)
    assert lr_factor(2, 20, warmup) == 1.0
    assert lr_factor(19, 20, warmup) == pytest.approx(1 / 18)


def test_one_step_runs_at_the_full_rate():
    assert warmup_steps(TrainSettings(steps=1), 1) == 0 and lr_factor(0, 1, 0) == 1.0


# ---------------------------------------------------------------------------------------------- step count
@pytest.mark.parametrize("kwargs, n, expected", [
    ({"steps": 7}, 1000, 7),  # steps wins, whatever the shard
    ({"steps": None, "epochs": 1.0}, 10, 3),  # ⌈10 / 4⌉
    ({"steps": None, "epochs": 1.0, "grad_accum": 2}, 10, 2),  # ⌈10 / (4·2)⌉: one step eats 8 examples
    ({"steps": None, "epochs": 2.0, "grad_accum": 2}, 10, 3),  # ⌈20 / 8⌉
    ({"steps": None, "epochs": 3.0, "batch_size": 2, "grad_accum": 3}, 12, 6),  # ⌈36 / 6⌉
    ({"steps": None, "epochs": 0.1}, 10, 1),  # ⌈0.25⌉ = 1: never zero steps
])
def test_total_steps_for(kwargs, n, expected):
    assert total_steps_for(TrainSettings(**kwargs), n) == expected


def test_grad_accum_keeps_examples_per_epoch():
    # The same epoch over 64 examples: 16 steps of 4, or 8 steps of 2 × 4.
    one = total_steps_for(TrainSettings(steps=None, epochs=1.0), 64)
    two = total_steps_for(TrainSettings(steps=None, epochs=1.0, grad_accum=2), 64)
    assert (one, two) == (16, 8)


# ---------------------------------------------------------------------------------------------- settings checks
@pytest.mark.parametrize("kwargs, field, message", [
    ({"max_length": 4}, "max_length", "max_length=4 is too small"),
    ({"max_length": 0}, "max_length", "max_length=0 is too small"),
    ({"grad_accum": 0}, "grad_accum", "grad_accum=0 must be >= 1"),
    ({"steps": None, "epochs": 0.0}, "epochs", "epochs=0.0 must be a finite number > 0"),
    ({"steps": None, "epochs": math.inf}, "epochs", "epochs=inf must be a finite number > 0"),
    ({"warmup_ratio": 1.0}, "warmup_ratio", "warmup_ratio=1.0 must be in [0, 1)"),
])
def test_schedule_settings_are_validated(kwargs, field, message):
    with pytest.raises(ConfigError) as info:
        TrainSettings(**kwargs)
    assert str(info.value).startswith(message) and info.value.field == field


def test_max_length_of_eight_is_enough():
    assert TrainSettings(max_length=8).max_length == 8


# ---------------------------------------------------------------------------------------------- stages and seeds
def test_stage_by_round_needs_the_number_of_rounds():
    with pytest.raises(UsageError, match="total_rounds"):
        stage_plan(4, TrainSettings(stage_by="round"), round_=1)


def test_reverse_by_round_is_the_mirror():
    cfg = TrainSettings(stages="reverse", stage_by="round", tau=0.5)
    assert stage_plan(2, cfg, round_=1, total_rounds=4) == ["llm"] * 2
    assert stage_plan(2, cfg, round_=3, total_rounds=4) == ["encoder"] * 2


def test_mixed_seed_differs_per_round_and_client_and_is_stable():
    assert mixed_seed(0, 1, "0") == mixed_seed(0, 1, "0")
    assert len({mixed_seed(0, r, c) for r in (1, 2) for c in ("0", "1")}) == 4
    assert 0 <= mixed_seed(2**40, 10**6, "x") < 2**31 - 1
