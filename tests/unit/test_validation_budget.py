"""Validation stays cheap: a bounded sample of rows and passes spaced to a share of the run."""

import pytest

from deltatune.train.validation import (EVAL_POINTS, FORWARD_SHARE, VALIDATION_BUDGET, auto_eval_steps,
                                        eval_points, sample_rows)


@pytest.mark.parametrize("total,step_tokens,val_tokens", [(60, 480, 2400), (100, 4000, 20000), (1000, 2048, 50000),
                                                          (80, 2000, 800), (5, 100, 10**6)])
def test_automatic_spacing_keeps_the_estimated_cost_within_the_budget(total, step_tokens, val_tokens):
    every = auto_eval_steps(total, step_tokens, val_tokens)
    passes = 1 + len(eval_points(total, every))  # step 0 too
    assert passes <= EVAL_POINTS + 1
    cost = passes * FORWARD_SHARE * val_tokens / (total * step_tokens)
    assert cost <= VALIDATION_BUDGET or passes == 2  # the passes at the start and the end always run


def test_cheap_validation_gets_ten_points_and_costly_validation_two():
    assert auto_eval_steps(100, 4000, 400) == 10  # 10 passes besides step 0
    assert eval_points(100, auto_eval_steps(100, 4000, 10**6)) == [100]
    assert auto_eval_steps(10, 100, 0) == 10  # no validation tokens: nothing to space


def test_a_large_split_is_sampled_to_a_fixed_subset():
    rows = list(range(1000))
    sample = sample_rows(rows, 100, seed=3)
    assert len(sample) == 100 and sample == sorted(sample) and sample == sample_rows(rows, 100, seed=3)
    assert sample != sample_rows(rows, 100, seed=4)
    assert sample_rows(rows, 0, seed=3) is rows and sample_rows(rows[:50], 100, seed=3) == rows[:50]
