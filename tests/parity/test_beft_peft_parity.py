"""BEFT against PEFT: files loaded both ways give the same logits, the files carry PEFT's keys,
shapes, dtypes and config fields, seeded initialisation draws PEFT's values, one backward step
gives PEFT's gradients, and merging into the bias round-trips exactly."""

import copy
import json

import pytest
import torch

import deltatune as dt
from peft_roundtrip import assert_same_files, deltatune_file_to_peft, peft_file_to_deltatune
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")

ATOL = 1e-5

# case -> (architecture, config fields). PEFT wraps nn.Linear only, so GPT-2 (Conv1D) has no case.
CASES = {
    "qwen2-default-targets": ("qwen2", {}),
    "llama-attention-and-mlp": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "qwen2-all-linear": ("qwen2", dict(target_modules="all-linear")),
}


def _peft(base, case, seed=2):
    model = peft.get_peft_model(copy.deepcopy(base), peft.BeftConfig(task_type="CAUSAL_LM", **CASES[case][1]))
    randomize_adapter(model, seed=seed)
    return model


def _ours(base, case, seed=5):
    model = dt.add_adapter(copy.deepcopy(base), dt.BeftConfig(task_type="CAUSAL_LM", **CASES[case][1]))
    randomize_adapter(model, seed=seed)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_deltatune_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    diff = parity_results[f"beft-{case}: PEFT file -> deltatune"] = peft_file_to_deltatune(base, _peft(base, case), tmp_path)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_saves_peft_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    diff = parity_results[f"beft-{case}: deltatune file -> PEFT"] = deltatune_file_to_peft(base, _ours(base, case), tmp_path)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_match_peft(case, tmp_path):
    base = tiny_model(CASES[case][0])
    assert_same_files(_peft(base, case), _ours(base, case), tmp_path,
                      ("init_weights", "peft_type", "task_type", "modules_to_save", "inference_mode"))
    their_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    if not isinstance(their_cfg["target_modules"], str):
        assert sorted(our_cfg["target_modules"]) == sorted(their_cfg["target_modules"])


@pytest.mark.parametrize("init_weights", [True, False])
def test_seeded_initialisation_draws_peft_values(init_weights):
    base, ids = tiny_model("llama"), sample_ids()
    fields = dict(target_modules=["q_proj", "v_proj"], init_weights=init_weights)
    torch.manual_seed(4)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.BeftConfig(**fields))
    torch.manual_seed(4)
    ours = dt.add_adapter(copy.deepcopy(base), dt.BeftConfig(**fields))
    their_values = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters() if p.requires_grad}
    our_values = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert set(our_values) == set(their_values)
    for name, value in our_values.items():
        assert torch.equal(value, their_values[name]), name
    if init_weights:
        assert torch.equal(eval_logits(ours, ids), eval_logits(base, ids))


def test_gradients_of_one_step_equal_peft(tmp_path):
    base, ids = tiny_model("llama"), sample_ids()
    theirs = _peft(base, "llama-attention-and-mlp")
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path, trainable=True)
    for model in (theirs, ours):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    their_grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(our_grads) == set(their_grads)
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_merge_into_bias_round_trips_and_matches_peft(tmp_path):
    base, ids = tiny_model("qwen2"), sample_ids()
    theirs = _peft(base, "qwen2-default-targets")
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path)
    tuned = eval_logits(ours, ids)
    weights = {n: p.detach().clone() for n, p in ours.named_parameters()}
    dt.merge(ours, verbose=False)
    torch.testing.assert_close(eval_logits(ours, ids), tuned, atol=1e-5, rtol=1e-5)
    dt.unmerge(ours)
    assert all(torch.equal(p, weights[n]) for n, p in ours.named_parameters())
    assert torch.equal(eval_logits(ours, ids), tuned)
    merged = dt.unload(copy.deepcopy(ours), merge=True, verbose=False)
    their_merged = theirs.merge_and_unload()
    for (name, p), (_, q) in zip(merged.named_parameters(), their_merged.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_merging_into_a_layer_without_bias_says_so():
    model = dt.add_adapter(tiny_model("llama"), dt.BeftConfig())  # Llama's v_proj has no bias
    with pytest.raises(ValueError, match="no bias"):
        dt.merge(model, verbose=False)
