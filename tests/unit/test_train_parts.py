"""Pieces of the training loop: schedules, weight-decay groups, data order."""

import math

import pytest
import torch

from deltatune.train.batching import epoch_batches as _batches_for_epoch
from deltatune.train.optimizers import param_groups
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
    # warm-up, the peak, then a linear decay over the last 20% of the steps
    assert _lrs("wsd", 2, 10) == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="schedule 'step'"):
        _lrs("step", 0, 2)


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[0].weight.requires_grad_(True)
    groups = param_groups(model, 0.1, lr=1e-3)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model[0].weight)}
    assert [g["lr"] for g in groups] == [1e-3, 1e-3]


def test_lora_plus_gives_the_b_matrices_the_higher_rate():
    import deltatune as dt

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    dt.add_adapter(model, dt.LoraConfig(r=2, target_modules=["0", "1"], lora_bias=True))
    groups = param_groups(model, 0.01, lr=1e-4, lora_plus_ratio=16)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rate[id(p)] == pytest.approx(1.6e-3 if ".lora_B." in name else 1e-4), name
    assert {g["weight_decay"] for g in groups} == {0.01, 0.0}  # B's bias: the higher rate, no decay
    plain = param_groups(model, 0.01, lr=1e-4)
    assert len(plain) == 2 and {g["lr"] for g in plain} == {1e-4}


def test_lora_plus_is_refused_for_methods_without_b_matrices():
    from deltatune.train import ConfigError
    from deltatune.train.checks import check_settings
    from deltatune.train.config import TrainConfig

    check_settings(TrainConfig(lora_plus_ratio=16))
    with pytest.raises(ConfigError, match="lora_plus_ratio"):
        check_settings(TrainConfig(method="ia3", lora_plus_ratio=16))
    with pytest.raises(ConfigError, match="lora_plus_ratio"):
        check_settings(TrainConfig(lora_plus_ratio=-1))


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
    from deltatune.train.validation import eval_batch_size

    assert eval_batch_size(TrainConfig(batch_size=3)) == 12
    assert eval_batch_size(TrainConfig(batch_size=3, eval_batch_size=5)) == 5
    with pytest.raises(ConfigError, match="eval_batch_size"):
        check_settings(TrainConfig(eval_batch_size=-1))


def test_epochs_schedule_and_rate_come_from_the_method_unless_given():
    from deltatune.train import ConfigError, TrainConfig
    from deltatune.train.checks import check_settings
    from deltatune.train.methods import epochs_for, learning_rate, schedule_for

    lora, loha = TrainConfig(), TrainConfig(method="loha")
    assert (epochs_for(lora), schedule_for(lora), learning_rate(lora)) == (1.0, "cosine", 1e-3)
    assert (epochs_for(loha), schedule_for(loha)) == (3.0, "cosine")
    given = TrainConfig(epochs=2, schedule="wsd", lr=5e-4)
    assert (epochs_for(given), schedule_for(given), learning_rate(given)) == (2.0, "wsd", 5e-4)
    assert epochs_for(given, epoch_tokens=1000) == 2.0  # given epochs are kept, however small the data
    with pytest.raises(ConfigError, match="schedule"):
        check_settings(TrainConfig(schedule="step"))


def test_lora_takes_more_passes_over_a_small_dataset_up_to_three():
    from deltatune.train import TrainConfig
    from deltatune.train.methods import MAX_EPOCHS, RECIPES, epochs_for

    floor = RECIPES["lora"].min_tokens
    lora = TrainConfig()
    assert epochs_for(lora, epoch_tokens=floor) == 1.0  # one epoch reads enough
    assert epochs_for(lora, epoch_tokens=floor // 2 + 1) == 2.0
    assert epochs_for(lora, epoch_tokens=8929) == 3.0  # the default job's 160 rows
    assert epochs_for(lora, epoch_tokens=10) == MAX_EPOCHS == 3.0
    assert epochs_for(TrainConfig(method="loha"), epoch_tokens=10) == 3.0  # other recipes: their own epochs
