"""Poly (and Multi-Head Routing) against PEFT: files loaded both ways give the same logits with
several task ids in one batch, the files carry PEFT's keys, shapes, dtypes and config fields,
one backward step (the router's relaxed-Bernoulli sample drawn from the same seed) gives PEFT's
gradients, and merging is refused with the reason. PEFT routes task_ids only through its task
wrappers, so its configs name task_type (deltatune writes CAUSAL_LM when none is given). PEFT's
Poly wraps nn.Linear only, so the cases are Llama and Qwen2 (GPT-2's Conv1D has no PEFT
counterpart to compare with)."""

import copy

import pytest
import torch

import deltatune as dt
from peft_roundtrip import assert_same_files, peft_name
from tiny_models import randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")

ATOL = 1e-5
TASKS = torch.tensor([0, 2, 1])  # one task per row of sample_ids(): three different tasks in one batch

CASES = {
    "poly-llama": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=2, n_tasks=3, n_skills=4)),
    "mhr-qwen2": ("qwen2", dict(target_modules="all-linear", r=2, n_tasks=3, n_skills=3, n_splits=2)),
    "mhr-four-splits-llama": ("llama", dict(target_modules=["k_proj", "up_proj"], r=4, n_tasks=4, n_skills=2,
                                            n_splits=4)),
}


def _logits(model, ids, tasks=TASKS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, task_ids=tasks).logits


def _peft(base, case, seed=2):
    model = peft.get_peft_model(copy.deepcopy(base), peft.PolyConfig(task_type="CAUSAL_LM", init_weights=False,
                                                                          **CASES[case][1]))
    randomize_adapter(model, seed=seed)
    return model


def _ours(base, case, seed=5):
    model = dt.add_adapter(copy.deepcopy(base), dt.PolyConfig(init_weights=False, **CASES[case][1]))
    randomize_adapter(model, seed=seed)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_file_to_deltatune(case, tmp_path, parity_results):
    base, ids = tiny_model(CASES[case][0]), sample_ids()
    theirs = _peft(base, case)
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path)
    expected = _logits(theirs, ids)
    assert (expected - base(ids).logits).abs().max() > 1e-2
    rows = [_logits(theirs, ids, torch.full((3,), t)) for t in range(3)]
    assert (rows[0] - rows[1]).abs().max() > 1e-3  # the tasks really differ
    diff = (_logits(ours, ids) - expected).abs().max().item()
    for t in range(3):  # every row as each task
        diff = max(diff, (_logits(ours, ids, torch.full((3,), t)) - rows[t]).abs().max().item())
    parity_results[f"{case}: PEFT file -> deltatune"] = diff
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_file_to_peft(case, tmp_path, parity_results):
    base, ids = tiny_model(CASES[case][0]), sample_ids()
    ours = _ours(base, case)
    dt.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    expected = _logits(ours, ids)
    assert (expected - base(ids).logits).abs().max() > 1e-2
    diff = (_logits(theirs, ids) - expected).abs().max().item()
    parity_results[f"{case}: deltatune file -> PEFT"] = diff
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_match_peft(case, tmp_path):
    base = tiny_model(CASES[case][0])
    assert_same_files(_peft(base, case), _ours(base, case), tmp_path,
                      ["r", "n_tasks", "n_skills", "n_splits", "poly_type", "init_weights", "target_modules"])


def test_fresh_adapter_matches_peft_draws_and_changes_nothing():
    base, ids = tiny_model("llama"), sample_ids()
    torch.manual_seed(11)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PolyConfig(task_type="CAUSAL_LM", **CASES["poly-llama"][1]))
    torch.manual_seed(11)
    ours = dt.add_adapter(copy.deepcopy(base), dt.PolyConfig(**CASES["poly-llama"][1]))
    theirs_state = {peft_name(k): v for k, v in theirs.named_parameters() if v.requires_grad}
    ours_state = {k.replace(".default", ""): v for k, v in ours.named_parameters() if v.requires_grad}
    assert set(theirs_state) == set(ours_state)
    for key, value in ours_state.items():
        assert torch.equal(value, theirs_state[key]), key
    assert torch.equal(_logits(ours, ids), base(ids).logits)  # B starts at zero


@pytest.mark.parametrize("case", ["poly-llama", "mhr-qwen2"])
def test_gradients_match_peft(case, tmp_path):
    base, ids = tiny_model(CASES[case][0]), sample_ids()
    theirs = _peft(base, case)
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path, trainable=True)
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(3)  # the routers' relaxed-Bernoulli samples: the same draws in the same order
        model(input_ids=ids, labels=ids, task_ids=TASKS).loss.backward()
    their_grads = {peft_name(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {n.replace(".default", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert our_grads and set(our_grads) == set(their_grads)
    for name, grad in our_grads.items():
        assert grad is not None and grad.abs().max() > 0, name
        torch.testing.assert_close(grad, their_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_merge_is_refused_with_the_reason():
    ours = _ours(tiny_model("llama"), "poly-llama")
    with pytest.raises(ValueError, match="task_ids"):
        dt.merge(ours, verbose=False)
