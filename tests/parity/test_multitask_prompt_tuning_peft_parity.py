"""Multitask prompt tuning against PEFT: files loaded both ways give the same logits with several
task ids in one batch, the files carry PEFT's keys, shapes and config fields, one backward step
gives PEFT's gradients, the source-task initialisations read PEFT's files as PEFT does, and
``generate`` (task ids set for the block) agrees with full forward passes."""

import copy

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from peft_roundtrip import assert_same_files
from tiny_models import randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")

ATOL = 1e-5
N = 3
TASKS = torch.tensor([1, 0, 2])
CASES = {
    "mpt-llama": ("llama", dict(num_tasks=3, num_ranks=1)),
    "mpt-qwen2-rank2": ("qwen2", dict(num_tasks=3, num_ranks=2)),
    "mpt-gpt2": ("gpt2", dict(num_tasks=4, num_ranks=3)),
}


def _peft(base, case, seed=2, **fields):
    config = peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                              **{**CASES[case][1], **fields})
    model = peft.get_peft_model(copy.deepcopy(base), config)
    randomize_adapter(model, seed=seed)
    return model


def _ours(base, case, seed=5):
    model = dt.add_adapter(copy.deepcopy(base), dt.MultitaskPromptTuningConfig(num_virtual_tokens=N,
                                                                                **CASES[case][1]))
    randomize_adapter(model, seed=seed)
    return model


def _logits(model, ids, tasks=TASKS):
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=tasks).logits
    return logits[:, -ids.shape[1]:]  # PEFT returns the virtual positions too; deltatune drops them


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_file_to_deltatune(case, tmp_path, parity_results):
    base, ids = tiny_model(CASES[case][0]), sample_ids()
    theirs = _peft(base, case)
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path)
    expected = _logits(theirs, ids)
    assert (expected - base(ids).logits).abs().max() > 1e-2
    per_task = [_logits(theirs, ids, torch.full((3,), t)) for t in range(3)]
    assert (per_task[0] - per_task[1]).abs().max() > 1e-3  # the tasks really differ
    diff = (_logits(ours, ids) - expected).abs().max().item()
    for t in range(3):
        diff = max(diff, (_logits(ours, ids, torch.full((3,), t)) - per_task[t]).abs().max().item())
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
                      ["num_tasks", "num_ranks", "num_virtual_tokens", "token_dim", "num_layers",
                       "num_attention_heads", "num_transformer_submodules", "task_type", "prompt_tuning_init"])


def test_gradients_match_peft(tmp_path):
    base, ids = tiny_model("llama"), sample_ids()
    theirs = _peft(base, "mpt-llama")
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path, trainable=True)
    for model in (theirs, ours):
        model.train()
        model(input_ids=ids, labels=ids, task_ids=TASKS).loss.backward()
    their_encoder, our_encoder = theirs.prompt_encoder["default"], ours.deltatune_prompts.encoders["default"]
    for name in ("embedding.weight", "prefix_task_cols", "prefix_task_rows"):
        mine, other = our_encoder.get_parameter(name).grad, their_encoder.get_parameter(name).grad
        assert mine is not None and mine.abs().max() > 0, name
        torch.testing.assert_close(mine, other, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("init", ["EXACT_SOURCE_TASK", "AVERAGE_SOURCE_TASKS", "ONLY_SOURCE_SHARED"])
def test_source_task_init_reads_peft_files_as_peft(init, tmp_path, parity_results):
    base, ids = tiny_model("llama"), sample_ids()
    _peft(base, "mpt-llama").save_pretrained(tmp_path / "source")
    source = str(tmp_path / "source" / "adapter_model.safetensors")
    fields = dict(num_tasks=1, num_ranks=1, prompt_tuning_init=init, prompt_tuning_init_state_dict_path=source,
                  prompt_tuning_init_task=2)
    torch.manual_seed(7)  # ONLY_SOURCE_SHARED keeps the drawn task factors: the same draws in both tools
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, **fields))
    torch.manual_seed(7)
    ours = dt.add_adapter(copy.deepcopy(base), dt.MultitaskPromptTuningConfig(num_virtual_tokens=N, **fields))
    their_encoder, our_encoder = theirs.prompt_encoder["default"], ours.deltatune_prompts.encoders["default"]
    for name in ("embedding.weight", "prefix_task_cols", "prefix_task_rows"):
        assert torch.equal(our_encoder.get_parameter(name), their_encoder.get_parameter(name)), name
    saved = load_file(source)
    assert torch.equal(our_encoder.embedding.weight, saved["prompt_embeddings"])
    if init == "EXACT_SOURCE_TASK":
        assert torch.equal(our_encoder.prefix_task_cols[0], saved["prefix_task_cols"][2])
    tasks = torch.zeros(3, dtype=torch.long)
    diff = (_logits(ours, ids, tasks) - _logits(theirs, ids, tasks)).abs().max().item()
    parity_results[f"mpt-llama {init} init from a PEFT file"] = diff
    assert diff <= ATOL


def test_only_source_shared_reads_a_prompt_tuning_file(tmp_path):
    base = tiny_model("qwen2")
    source = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                              num_virtual_tokens=N))
    source.save_pretrained(tmp_path)
    ours = dt.add_adapter(copy.deepcopy(base), dt.MultitaskPromptTuningConfig(
        num_virtual_tokens=N, num_tasks=2, prompt_tuning_init="ONLY_SOURCE_SHARED",
        prompt_tuning_init_state_dict_path=str(tmp_path)))  # a folder: its adapter_model.safetensors
    assert torch.equal(ours.deltatune_prompts.encoders["default"].embedding.weight,
                       load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"])
    with pytest.raises(ValueError, match="ONLY_SOURCE_SHARED"):  # a prompt-tuning file has no task factors
        dt.add_adapter(copy.deepcopy(base), dt.MultitaskPromptTuningConfig(
            num_virtual_tokens=N, prompt_tuning_init="EXACT_SOURCE_TASK",
            prompt_tuning_init_state_dict_path=str(tmp_path)))


def _full_pass_tokens(model, out, prompt_length, tasks):
    with torch.no_grad():
        logits = model(out, task_ids=tasks).logits
    return logits[:, -out.shape[1]:].argmax(-1)[:, prompt_length - 1:-1]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_with_task_ids(arch):
    base, ids = tiny_model(arch), sample_ids()
    ours = _ours(base, f"mpt-{arch}").eval()
    mask = torch.ones_like(ids)
    with torch.no_grad(), dt.use_task_ids(ours, TASKS):
        out = ours.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, ids.shape[1]:], _full_pass_tokens(ours, out, ids.shape[1], TASKS))
    with pytest.raises(ValueError, match="task_ids"):  # no task ids: a clear error naming what to pass
        ours(ids)
