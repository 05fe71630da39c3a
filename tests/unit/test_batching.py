"""Length-grouped batches: every row once per epoch, less padding, still shuffled, seeded."""

import random

import pytest

from deltatune.train.batching import GROUP_BATCHES, epoch_batches, padding_share


def _lengths(n, seed=0):
    rng = random.Random(seed)
    return [rng.randint(10, 500) for _ in range(n)]


def test_without_lengths_the_order_is_the_plain_seeded_shuffle():
    import torch

    order = torch.randperm(100, generator=torch.Generator().manual_seed(3 * 1000003 + 2)).tolist()
    assert epoch_batches(100, 8, seed=3, epoch=2) == [order[i:i + 8] for i in range(0, 96, 8)]


@pytest.mark.parametrize("world", [1, 2])
def test_grouped_batches_take_every_usable_row_once(world):
    n, batch = 1000, 4
    lengths = _lengths(n)
    taken = []
    for rank in range(world):
        batches = epoch_batches(n, batch, seed=1, epoch=0, rank=rank, world=world, lengths=lengths)
        assert all(len(b) == batch for b in batches)
        taken += [i for b in batches for i in b]
    assert len(taken) == len(set(taken)) == n - n % (batch * world)


def test_grouping_cuts_padding_and_keeps_the_order_random():
    n, batch = 2000, 8
    lengths = _lengths(n)
    plain = epoch_batches(n, batch, seed=0, epoch=0)
    grouped = epoch_batches(n, batch, seed=0, epoch=0, lengths=lengths)
    assert padding_share(grouped, lengths) < 0.1 < 0.4 < padding_share(plain, lengths)
    # not sorted overall: consecutive batches are not in length order, and epochs differ
    firsts = [lengths[b[0]] for b in grouped]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)
    assert epoch_batches(n, batch, seed=0, epoch=1, lengths=lengths) != grouped
    assert epoch_batches(n, batch, seed=0, epoch=0, lengths=lengths) == grouped  # seeded: a resume takes the same


def test_each_batch_comes_from_one_window_of_the_shuffle():
    # rows are sorted within windows of GROUP_BATCHES batches of the shuffled order, not overall,
    # so which rows meet in a batch changes from epoch to epoch
    import torch

    n, batch = GROUP_BATCHES * 4 * 3, 4
    lengths = _lengths(n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(5 * 1000003 + 0)).tolist()
    window_of = {row: position // (GROUP_BATCHES * batch) for position, row in enumerate(order)}
    grouped = epoch_batches(n, batch, seed=5, epoch=0, lengths=lengths)
    assert all(len({window_of[i] for i in b}) == 1 for b in grouped)
    assert len({window_of[b[0]] for b in grouped[:GROUP_BATCHES]}) > 1  # windows' batches are interleaved


def test_wrong_number_of_lengths_is_refused():
    with pytest.raises(ValueError, match="lengths"):
        epoch_batches(100, 4, seed=0, epoch=0, lengths=[1] * 99)


def test_padding_share_counts_pad_positions():
    assert padding_share([[0, 1]], [2, 4]) == pytest.approx(0.25)
    assert padding_share([], []) == 0.0


def test_phase_timer_refuses_an_unknown_phase_and_splits_the_rest():
    import time

    from deltatune.train.timing import PhaseTimer

    timer = PhaseTimer()
    with timer.phase("steps"):
        time.sleep(0.02)
    with pytest.raises(ValueError, match="unknown phase"):
        with timer.phase("lunch"):
            pass
    split = timer.split()
    assert split["steps"] >= 0.02 and split["validation"] == 0 and split["other"] >= 0
    assert split["total"] == pytest.approx(sum(v for k, v in split.items() if k != "total"), abs=0.005)


@pytest.mark.parametrize("budget", [600, 2000])
def test_token_batches_keep_every_batch_within_the_budget_and_every_row_once(budget):
    from deltatune.train.batching import token_batches

    lengths = _lengths(700)
    batches = token_batches(lengths, budget, seed=2, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(700))
    assert all(len(b) * max(lengths[i] for i in b) <= budget for b in batches)
    # short rows travel many to a batch: a budget of 2000 puts at least 4 rows of <= 500 tokens in each
    if budget == 2000:
        assert min(len(b) for b in batches[:-1]) >= 4
    assert padding_share(batches, lengths) < 0.1  # sorted before cutting: little padding
    assert token_batches(lengths, budget, seed=2, epoch=0) == batches
    assert token_batches(lengths, budget, seed=2, epoch=1) != batches


def test_token_batches_put_a_row_longer_than_the_budget_alone():
    from deltatune.train.batching import token_batches

    batches = token_batches([10, 900, 20], 100, seed=0, epoch=0)
    assert sorted(map(sorted, batches)) == [[0, 2], [1]]


def test_token_batches_give_every_rank_as_many_batches():
    from deltatune.train.batching import token_batches

    lengths = _lengths(301, seed=4)
    per_rank = [token_batches(lengths, 1500, seed=0, epoch=0, rank=r, world=3) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1
    rows = [i for batches in per_rank for b in batches for i in b]
    assert len(rows) == len(set(rows))


def test_make_batches_picks_the_way_the_settings_ask():
    from deltatune.train.batching import make_batches, token_batches

    lengths = _lengths(200)
    assert make_batches(lengths, 8, 0, False, 1, 0) == epoch_batches(200, 8, 1, 0)
    assert make_batches(lengths, 8, 0, True, 1, 0) == epoch_batches(200, 8, 1, 0, lengths=lengths)
    assert make_batches(lengths, 8, 1024, False, 1, 0) == token_batches(lengths, 1024, 1, 0)
