"""--auto-batch: the largest divisor of batch_size that fits, the effective batch kept."""

import torch

from deltatune.data import Example
from deltatune.loss import TrainingLoss
from deltatune.train.auto_batch import choose_micro_batch, divisors_descending, largest_fitting
from tiny_models import tiny_llama_64


def test_largest_fitting_tries_divisors_from_the_top():
    tried = []

    def fits(b):
        tried.append(b)
        return b <= 5
    assert largest_fitting(12, fits) == 4 and tried == [12, 6, 4]
    assert largest_fitting(8, lambda b: False) is None
    assert divisors_descending(12) == [12, 6, 4, 3, 2, 1]


def _rows(n, length):
    return [Example(list(range(1, length + 1)), [-100] * 4 + list(range(5, length + 1))) for _ in range(n)]


def test_on_a_cpu_the_choice_follows_the_measured_memory_per_row():
    model = tiny_llama_64()
    rows = _rows(8, 48)
    lengths = [48] * 8
    state = torch.get_rng_state()
    args = (TrainingLoss(model), model, rows, lengths, 8, 0, False, False, torch.device("cpu"))
    roomy, how = choose_micro_batch(*args, available=10**12)
    assert roomy == 8 and "a row of 48 tokens" in how
    assert choose_micro_batch(*args, available=1)[0] == 1
    assert torch.equal(torch.get_rng_state(), state)  # the probe leaves the run's random numbers alone
    assert all(p.grad is None for p in model.parameters())
