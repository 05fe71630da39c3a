"""Loss passes that run the rows' shared beginning once give the plain pass's sums."""

import random

import pytest
import torch

import deltatune as dt
from deltatune.data import Example, collate
from deltatune.data.tokenize import IGNORE
from deltatune.evaluate.generation import loss_sums
from deltatune.evaluate.shared_prefix import MIN_SHARED_TOKENS, loss_batches, shared_prefix_length
from deltatune.loss import TrainingLoss
from tiny_models import VOCAB, randomize_adapter, tiny_model


def chat_rows(count: int, shared: int, seed: int = 0) -> list[Example]:
    """Rows that all begin with the same ``shared`` tokens (a system prompt), then a question of
    varying length, then a scored answer."""
    rng = random.Random(seed)
    system = [rng.randrange(3, VOCAB) for _ in range(shared)]
    rows = []
    for _ in range(count):
        question = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 9))]
        answer = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 6))]
        ids = system + question + answer
        rows.append(Example(ids, [IGNORE] * (shared + len(question)) + answer))
    return rows


def _record_batch_sizes(model) -> list[int]:
    sizes = []
    model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append((args[0] if args else kwargs["input_ids"]).shape[0]), with_kwargs=True)
    return sizes


def plain_sums(model, rows, pad_id=0):
    """Each row alone through the model's own loss: the definition the shared pass must meet."""
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for row in rows:
            batch = collate([row], pad_id, packed=False)
            tokens = (batch["labels"][:, 1:] != IGNORE).sum()
            loss = model(**batch, use_cache=False).loss
            total += torch.tensor([loss.item() * tokens.item(), tokens.item()], dtype=torch.float64)
    return total


def test_the_shared_length_stops_before_a_scored_position_and_leaves_each_row_a_token():
    rows = [Example([5, 6, 7, 8, 9], [IGNORE, IGNORE, IGNORE, 8, 9]), Example([5, 6, 7, 8, 4], [IGNORE] * 4 + [4])]
    assert shared_prefix_length(rows) == 2  # position 2 predicts the scored token 8
    assert shared_prefix_length([Example([5, 6, 7], [IGNORE] * 3)] * 2) == 2  # one token left of each row
    assert shared_prefix_length([Example([5, 6], [IGNORE, 6]), Example([4, 6], [IGNORE, 6])]) == 0


def test_loss_batches_are_cut_in_length_order_and_flag_a_shared_beginning():
    prompt = list(range(100, 100 + MIN_SHARED_TOKENS + 2))
    alike = [Example(prompt + [i], [IGNORE] * len(prompt) + [i]) for i in (1, 2)]
    # token order would pair the 3-token row with the 40-token one and the 4-token row with the 39-token one
    unlike = [Example(ids, [IGNORE] * (len(ids) - 1) + ids[-1:]) for ids in
              ([1, 50, 3], [1, 60] + [4] * 38, [2, 50, 3, 3], [2, 60] + [4] * 37)]
    batches = loss_batches(alike + unlike, batch_size=2)
    assert [[len(r.input_ids) for r in chunk] for chunk, _ in batches] == [[3, 4], [11, 11], [39, 40]]
    assert [sharing for _, sharing in batches] == [False, True, False]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_loss_sums_with_a_shared_prompt_equal_the_plain_pass(arch):
    model = tiny_model(arch)
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapter(model)
    model.eval()
    rows = chat_rows(11, shared=MIN_SHARED_TOKENS + 4)
    sizes = _record_batch_sizes(model)
    got = loss_sums(model, rows, batch_size=4, pad_id=0)
    assert 1 in sizes, "the shared beginning was not run on its own"
    torch.testing.assert_close(got, plain_sums(model, rows), rtol=1e-5, atol=1e-5)


def test_rows_without_a_long_shared_beginning_take_the_plain_pass():
    model = tiny_model("llama")
    rows = chat_rows(6, shared=MIN_SHARED_TOKENS - 3)
    sizes = _record_batch_sizes(model)
    got = loss_sums(model, rows, batch_size=3, pad_id=0)
    assert sizes == [3, 3]
    torch.testing.assert_close(got, plain_sums(model, rows), rtol=1e-5, atol=1e-5)


def test_a_cache_is_refused_where_the_models_own_loss_is_used():
    model = tiny_model("gemma")
    loss_of = TrainingLoss(model)
    assert loss_of.reason is not None
    with pytest.raises(ValueError, match="cached prefix"):
        loss_of(collate(chat_rows(2, 10), 0, packed=False), cache=object())
