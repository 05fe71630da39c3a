"""Validation stays cheap: a bounded sample of rows and passes spaced to a share of the run."""

import pytest

from deltatune.train.validation import (EVAL_POINTS, FORWARD_SHARE, VALIDATION_BUDGET, ValidationPlan,
                                        eval_points, plan_validation, sample_rows)


@pytest.mark.parametrize("total,step_tokens,val_tokens", [(60, 480, 2400), (100, 4000, 20000), (1000, 2048, 50000),
                                                          (80, 2000, 800), (5, 100, 10**6), (37, 1040, 5253)])
def test_automatic_spacing_keeps_the_estimated_cost_within_the_budget(total, step_tokens, val_tokens):
    plan = plan_validation(total, step_tokens, val_tokens)
    passes = plan.passes(total)
    assert passes <= EVAL_POINTS + 1
    cost = passes * FORWARD_SHARE * val_tokens / (total * step_tokens)
    assert cost <= VALIDATION_BUDGET or passes == 1  # the pass at the end always runs


def test_cheap_validation_gets_ten_points_and_costly_validation_only_the_last():
    assert plan_validation(100, 4000, 400) == ValidationPlan(10, True)  # 10 passes besides step 0
    assert plan_validation(100, 4000, 10**6) == ValidationPlan(100, False)  # the last pass alone
    assert plan_validation(100, 4000, 10**6).passes(100) == 1
    # two passes affordable: step 0 and the end, nothing between
    two = 2 * FORWARD_SHARE * 1000 / VALIDATION_BUDGET / 100
    assert plan_validation(100, two, 1000) == ValidationPlan(100, True)
    assert plan_validation(10, 100, 0) == ValidationPlan(10, True)  # no validation tokens: nothing to space


def test_eval_steps_sets_the_spacing_and_keeps_the_pass_at_step_0():
    assert plan_validation(100, 4000, 10**6, eval_steps=25) == ValidationPlan(25, True)
    assert ValidationPlan(25, True).passes(100) == 5 and eval_points(90, 25) == [25, 50, 75, 90]


def test_a_large_split_is_sampled_to_a_fixed_subset():
    rows = list(range(1000))
    sample = sample_rows(rows, 100, seed=3)
    assert len(sample) == 100 and sample == sorted(sample) and sample == sample_rows(rows, 100, seed=3)
    assert sample != sample_rows(rows, 100, seed=4)
    assert sample_rows(rows, 0, seed=3) is rows and sample_rows(rows[:50], 100, seed=3) == rows[:50]
