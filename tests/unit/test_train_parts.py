"""Pieces of the training loop: schedules, weight-decay groups, data order."""

import math

import pytest
import torch

from deltatune.train.batching import epoch_batches as _batches_for_epoch
from deltatune.train.loop import _param_groups
from deltatune.train.schedule import make_scheduler


def _lrs(name, warmup, total):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, name, warmup, total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedules():
    cosine = _lrs("cosine", 2, 10)
    assert cosine[:2] == [0.5, 1.0] and cosine[2] == pytest.approx(1.0)
    assert cosine[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:]))
    linear = _lrs("linear", 0, 4)
    assert linear == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert _lrs("constant", 1, 3) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="schedule 'step'"):
        _lrs("step", 0, 2)


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[0].weight.requires_grad_(True)
    groups = _param_groups(model, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model[0].weight)}


def test_data_order_is_seeded_and_ranks_split_each_global_batch():
    one = _batches_for_epoch(10, 4, seed=1, epoch=0, rank=0, world=1)
    again = _batches_for_epoch(10, 4, seed=1, epoch=0, rank=0, world=1)
    assert one == again and len(one) == 2 and all(len(b) == 4 for b in one)
    assert _batches_for_epoch(10, 4, seed=1, epoch=1, rank=0, world=1) != one  # a new order each epoch
    r0 = _batches_for_epoch(10, 2, seed=1, epoch=0, rank=0, world=2)
    r1 = _batches_for_epoch(10, 2, seed=1, epoch=0, rank=1, world=2)
    assert [a + b for a, b in zip(r0, r1)] == one  # together the ranks take the single-process batches


def test_evaluation_batches_are_four_training_batches_unless_set():
    from deltatune.train import ConfigError
    from deltatune.train.checks import check_settings
    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import eval_batch_size

    assert eval_batch_size(TrainConfig(batch_size=3)) == 12
    assert eval_batch_size(TrainConfig(batch_size=3, eval_batch_size=5)) == 5
    with pytest.raises(ConfigError, match="eval_batch_size"):
        check_settings(TrainConfig(eval_batch_size=-1))
