"""The preference objectives against TRL's own loss code and the papers' formulas, on a fixed batch.

TRL 1.x computes DPO's loss inside ``DPOTrainer._compute_loss`` (a method that reads a few trainer
attributes, called here on a stand-in for the trainer, with TRL's fused LM head on the model) and
ORPO's odds-ratio term in ``ORPOTrainer.odds_ratio_loss``. Where TRL has no such code (conservative
DPO's label smoothing is not in TRL 1.16's sigmoid loss; ORPO's SFT term, which TRL takes over the
prompt too), the papers' formulas are written out here, independently of deltatune's.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from deltatune.data.preference import PreferencePair
import deltatune as dt
from deltatune.evaluate.preference import batch_logps, pair_batch, pair_logps
from deltatune.logprobs import completion_logps
from deltatune.loss import TrainingLoss
from deltatune.train.objectives import PairLogps, dpo_loss, log1mexp, objective_loss, orpo_loss
from tiny_models import randomize_adapter, tiny_model

BETA = 0.3
REF = torch.tensor([[-30.0, -29.0], [-25.5, -27.0], [-33.0, -31.5]], dtype=torch.float64)  # (pairs, 2)


def _pairs() -> list[PreferencePair]:
    """Three pairs of random tokens: prompts and completions of different lengths (so rows pad)."""
    g = torch.Generator().manual_seed(5)
    ids = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731
    return [PreferencePair(ids(4), ids(3) + [2], ids(5) + [2]), PreferencePair(ids(6), ids(2) + [2], ids(2) + [2]),
            PreferencePair(ids(3), ids(6) + [2], ids(1) + [2])]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a: dict, b: dict, rtol=1e-4, atol=1e-6) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def _ours(model, objective, **settings):
    """Loss, per-pair results and gradients from deltatune's path: completion_logps + the objective."""
    model.zero_grad()
    batch = pair_batch(_pairs(), pad_id=0)
    sums, counts = completion_logps(TrainingLoss(model), batch)
    result = objective_loss(objective, PairLogps.from_rows(sums, counts), REF.float(), **settings)
    result.loss.backward()
    return result, _grads(model), (sums.detach(), counts)


def _trl_inputs(batch: dict) -> dict:
    completion_mask = (batch["labels"] != -100).long()
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "completion_mask": completion_mask, "ref_chosen_logps": REF[:, 0].float(),
            "ref_rejected_logps": REF[:, 1].float()}


def _trl_dpo_trainer(model, loss_type: str, beta: float, label_smoothing: float = 0.0):
    """The attributes ``DPOTrainer._compute_loss`` reads, with precomputed reference log-probabilities."""
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    return SimpleNamespace(model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
                           precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                           loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
                           _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                           _tp_size=1)


@pytest.fixture
def trl():
    return pytest.importorskip("trl")


def _trl_model():
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_model("llama").train()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


def test_dpo_loss_metrics_and_gradients_match_trl(trl):
    from trl.trainer.dpo_trainer import DPOTrainer

    model = _trl_model()
    ours, our_grads, (sums, _) = _ours(model, "dpo", beta=BETA, label_smoothing=0.0, orpo_lambda=0.0)
    model.zero_grad()
    trainer = _trl_dpo_trainer(model, "sigmoid", BETA)
    theirs = DPOTrainer._compute_loss(trainer, model, _trl_inputs(pair_batch(_pairs(), 0)), False)
    theirs.backward()
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-5, atol=1e-6)
    _close(our_grads, _grads(model))
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    metrics = ours.metrics()
    for mine, trls in (("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins"),
                       ("chosen_reward", "rewards/chosen"), ("rejected_reward", "rewards/rejected"),
                       ("chosen_logps", "logps/chosen"), ("rejected_logps", "logps/rejected")):
        assert metrics[mine] == pytest.approx(logged[trls], rel=1e-5, abs=1e-6), mine
    assert 0 < metrics["reward_accuracy"] < 1  # the batch has pairs on both sides, so accuracy is tested


def test_conservative_dpo_matches_the_formula_and_trl_per_pair(trl):
    """Label smoothing ε: -(1-ε)·logσ(βΔ) - ε·logσ(-βΔ) (Mitchell 2023, "cDPO"), written out here; and
    TRL's aot_unpaired loss, which for a single pair (sorting one value changes nothing) is the same."""
    from trl.trainer.dpo_trainer import DPOTrainer

    eps = 0.2
    model = _trl_model()
    ours, our_grads, (sums, _) = _ours(model, "dpo", beta=BETA, label_smoothing=eps, orpo_lambda=0.0)
    chosen, rejected = sums.chunk(2)
    delta = (chosen - REF[:, 0].float()) - (rejected - REF[:, 1].float())
    formula = (-(1 - eps) * F.logsigmoid(BETA * delta) - eps * F.logsigmoid(-BETA * delta)).mean()
    torch.testing.assert_close(ours.loss.detach(), formula, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ours.loss.detach(), -F.logsigmoid(BETA * delta).mean())  # ε changes the loss
    model.zero_grad()
    total = 0.0
    for i, pair in enumerate(_pairs()):
        inputs = _trl_inputs(pair_batch([pair], 0))
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = REF[i:i + 1, 0].float(), REF[i:i + 1, 1].float()
        loss = DPOTrainer._compute_loss(_trl_dpo_trainer(model, "aot_unpaired", BETA, eps), model, inputs, False)
        (loss / 3).backward()
        total += loss.item() / 3
    assert ours.loss.item() == pytest.approx(total, rel=1e-5)
    _close(our_grads, _grads(model))


def test_orpo_loss_and_gradients_match_trl_odds_ratio_and_the_paper(trl):
    """ORPO = SFT NLL of the chosen completion + λ·(-logσ(log odds ratio)): the odds-ratio term from
    TRL's ``odds_ratio_loss`` and per-token means from its ``get_batch_logps``; the NLL over the
    chosen completion's tokens (the paper's L_SFT; TRL's trainer also counts the prompt)."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    lam = 0.25
    model = tiny_model("llama").train()
    ours, our_grads, _ = _ours(model, "orpo", beta=BETA, label_smoothing=0.0, orpo_lambda=lam)
    model.zero_grad()
    batch = pair_batch(_pairs(), 0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    means = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    stand_in = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards, _, log_odds = ORPOTrainer.odds_ratio_loss(stand_in, *means.chunk(2))
    chosen_logits, chosen_labels = logits[:3, :-1], batch["labels"][:3, 1:]
    nll = F.cross_entropy(chosen_logits.reshape(-1, logits.shape[-1]), chosen_labels.reshape(-1), ignore_index=-100)
    theirs = nll - losses.mean()  # TRL's get_batch_loss_metrics: policy_nll_loss - losses.mean()
    theirs.backward()
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-5, atol=1e-6)
    _close(our_grads, _grads(model))
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, rtol=1e-5, atol=1e-6)
    assert ours.extra["log_odds_ratio"].item() == pytest.approx(log_odds.item(), rel=1e-5)
    assert ours.extra["nll"].item() == pytest.approx(nll.item(), rel=1e-5)


def test_dpo_formula_rewards_and_gradient_direction():
    """The paper's loss written out, and its gradient: up on the chosen, down on the rejected."""
    policy = PairLogps(torch.tensor([-10.0, -12.0], requires_grad=True),
                       torch.tensor([-11.0, -9.0], requires_grad=True), torch.tensor([4, 5]), torch.tensor([4, 3]))
    ref = torch.tensor([[-10.5, -10.0], [-12.0, -9.5]])
    result = dpo_loss(policy, ref[:, 0], ref[:, 1], beta=0.5)
    delta = torch.tensor([(-10.0 + 10.5) - (-11.0 + 10.0), (-12.0 + 12.0) - (-9.0 + 9.5)])
    assert result.loss.item() == pytest.approx((-F.logsigmoid(0.5 * delta)).mean().item(), rel=1e-6)
    torch.testing.assert_close(result.chosen_rewards, torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(result.rejected_rewards, torch.tensor([-0.5, 0.25]))
    assert result.metrics()["reward_accuracy"] == 0.5 and result.metrics()["reward_margin"] == pytest.approx(0.25)
    result.loss.backward()
    assert (policy.chosen.grad < 0).all() and (policy.rejected.grad > 0).all()  # descent raises chosen, lowers rejected
    # conservative DPO: a pair the policy is very sure of is pushed back (the ε term wins)
    sure = PairLogps(torch.tensor([0.0], requires_grad=True), torch.tensor([-200.0]), torch.tensor([1]),
                     torch.tensor([1]))
    dpo_loss(sure, torch.tensor([-1.0]), torch.tensor([-1.0]), beta=0.5, label_smoothing=0.1).loss.backward()
    assert sure.chosen.grad.item() > 0


def test_orpo_formula_written_out():
    c, r = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -3.0])
    nc, nr = torch.tensor([4, 3]), torch.tensor([2, 3])
    result = orpo_loss(PairLogps(c, r, nc, nr), weight=0.5)
    pc, pr = torch.exp(c / nc), torch.exp(r / nr)  # per-token mean probabilities
    odds = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
    expected = -(c.sum() / nc.sum()) + 0.5 * (-F.logsigmoid(odds)).mean()
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_log1mexp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-9, -1e-3, -0.5, -0.7, -5.0, -50.0], dtype=torch.float64)
    exact = torch.log(-torch.expm1(x))  # float64: exact enough to judge the float32 result by
    torch.testing.assert_close(log1mexp(x.float()).double(), exact, rtol=1e-6, atol=1e-7)
    assert math.isfinite(log1mexp(torch.tensor([-1e-9])).item())  # log(1 - exp(x)) in float32 would be -inf


@pytest.mark.parametrize("arch", ["llama", "gemma"])  # the fused path (Llama) and the model's own forward (Gemma)
def test_completion_logps_are_the_plain_log_softmax_sums(arch):
    model = tiny_model(arch)
    batch = pair_batch(_pairs(), pad_id=0)
    sums, counts = completion_logps(TrainingLoss(model), batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    token = logits.log_softmax(-1).gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(sums, (token * (labels != -100)).sum(1), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [4, 3, 7, 6, 3, 2]
    # scored in batches, the beginning every row shares run once from a cache: the same numbers
    pairs = _pairs()
    for p in pairs:
        p.prompt_ids[:0] = list(range(10, 20))  # a shared beginning long enough to be shared
    whole, _ = completion_logps(TrainingLoss(model), pair_batch(pairs, 0))
    shared, _ = pair_logps(model, pairs, batch_size=3, pad_id=0)
    torch.testing.assert_close(shared, torch.stack(whole.double().chunk(2), 1), rtol=1e-5, atol=1e-5)


def test_a_shared_prefix_run_once_gives_the_same_loss_and_gradients():
    """A training micro-batch runs the beginning its rows share once, with gradients, and continues
    every row from that key/value cache: the same loss and adapter gradients as whole rows."""
    model = tiny_model("llama").train()
    dt.add_adapter(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    randomize_adapter(model)
    pairs = _pairs()
    for p in pairs:
        p.prompt_ids[:0] = list(range(10, 20))  # as a chat template's system prompt begins every row
    results = []
    for share in (False, True):
        model.zero_grad()
        batch = pair_batch(pairs, 0, share_prefix=share)
        assert ("prefix_ids" in batch) == share
        sums, counts = batch_logps(TrainingLoss(model), batch)
        result = dpo_loss(PairLogps.from_rows(sums, counts), REF[:, 0].float(), REF[:, 1].float(), BETA)
        result.loss.backward()
        results.append((result.loss.detach(), _grads(model), batch["input_ids"].shape[1]))
    (whole, whole_grads, whole_width), (shared, shared_grads, shared_width) = results
    assert shared_width <= whole_width - 10
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-6)
    assert len(whole_grads) == 28  # A and B of the 14 adapted layers: the base is frozen
    _close(shared_grads, whole_grads)
