"""The learning-rate walk of ``deltatune compare --lr-search``: which rates it tries and which it keeps."""

import math

import pytest

from deltatune.cli.lr_search import grid_rate, search_rate


def _walk(losses: dict[float, float], start: float, factor: float = 4.0, tries: int = 4):
    tried: list[float] = []

    def loss_at(lr: float):
        tried.append(lr)
        return losses[lr]

    chosen, seen = search_rate(loss_at, start, factor, tries)
    return chosen, seen, tried


def test_walks_up_while_the_loss_falls_and_stops_at_the_first_rise():
    losses = {1e-4: 2.0, 4e-4: 1.0, 0.0016: 0.5, 0.0064: 0.7, 0.0256: 0.1}
    chosen, seen, tried = _walk(losses, 1e-4)
    assert tried == [1e-4, 4e-4, 0.0016, 0.0064]  # 0.0256 is never tried: the loss rose at 0.0064
    assert chosen == 0.0016 and seen[0.0064] == 0.7


def test_turns_down_when_the_larger_rate_is_worse():
    losses = {1e-3: 1.0, 4e-3: 3.0, 2.5e-4: 0.8, 6.25e-5: 0.9}
    chosen, _, tried = _walk(losses, 1e-3)
    assert tried == [1e-3, 4e-3, 2.5e-4, 6.25e-5]
    assert chosen == 2.5e-4


def test_a_failed_or_diverged_run_counts_as_worst():
    chosen, seen, tried = _walk({0.3: 0.5, 1.2: math.nan, 0.075: None}, 0.3, tries=3)
    assert tried == [0.3, 1.2, 0.075] and chosen == 0.3
    assert math.isinf(seen[1.2]) and math.isinf(seen[0.075])


def test_never_more_than_tries_rates():
    losses = {grid_rate(1e-5 * 4 ** k): 10.0 - k for k in range(8)}  # always better further up
    chosen, seen, tried = _walk(losses, 1e-5, tries=3)
    assert len(tried) == 3 and chosen == tried[-1] == grid_rate(1.6e-4)


def test_rates_are_on_a_three_digit_grid():
    assert grid_rate(0.3 * 4) == 1.2 and grid_rate(1e-4 * 4) == 4e-4


@pytest.mark.parametrize("factor, tries, message", [(1.0, 4, "factor"), (4.0, 1, "too few")])
def test_bad_settings_are_named(factor, tries, message):
    with pytest.raises(ValueError, match=message):
        search_rate(lambda lr: 1.0, 1e-3, factor, tries)


def test_two_failed_starts_end_the_walk():
    # e.g. BitFit on a model without biases: every rate fails the same way, so trying more wastes runs
    chosen, seen, tried = _walk({1e-3: None, 4e-3: None, 2.5e-4: 0.5}, 1e-3)
    assert tried == [1e-3, 4e-3] and all(math.isinf(v) for v in seen.values())
