"""Task ids for task-routed adapters (Poly, multitask prompt tuning): how they reach the adapters
(``model(..., task_ids=...)``, ``dt.use_task_ids``, ``dt.set_task_ids``), ``generate`` with
them, per-row adapter routing with them, and the errors for missing or bad ids."""

import copy

import pytest
import torch

import deltatune as dt
from deltatune.adapters.task_ids import TASKS_ATTR
from tiny_models import randomize_adapter, sample_ids, tiny_model

TASKS = torch.tensor([2, 0, 1])


def _poly(arch="llama", n_tasks=3, name="default", model=None):
    model = model if model is not None else tiny_model(arch)
    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "up_proj"]
    dt.add_adapter(model, dt.PolyConfig(r=2, n_tasks=n_tasks, n_skills=2, init_weights=False,
                                        target_modules=targets), name)
    randomize_adapter(model)
    return model.eval()


def _mpt(n_tasks=3):
    model = tiny_model("llama")
    dt.add_adapter(model, dt.MultitaskPromptTuningConfig(num_virtual_tokens=3, num_tasks=n_tasks))
    randomize_adapter(model)
    return model.eval()


def _rows_alone(model, ids, tasks):
    """Each row run on its own with its own task."""
    with torch.no_grad():
        return torch.cat([model(ids[i:i + 1], task_ids=tasks[i:i + 1]).logits for i in range(ids.shape[0])])


@pytest.mark.parametrize("make", [_poly, _mpt])
def test_missing_task_ids_say_what_to_pass(make):
    model = make()
    with pytest.raises(ValueError, match=r"pass task_ids.*use_task_ids"):
        model(sample_ids())


@pytest.mark.parametrize("make", [_poly, _mpt])
def test_each_row_uses_its_own_task(make):
    model, ids = make(), sample_ids()
    with torch.no_grad():
        mixed = model(ids, task_ids=TASKS).logits
        with dt.use_task_ids(model, TASKS):
            blocked = model(ids).logits
        dt.set_task_ids(model, TASKS.tolist())
        fixed = model(ids).logits
        other = model(ids, task_ids=0).logits  # a call's own ids win over the set ones; one int: every row
        dt.set_task_ids(model, None)
    torch.testing.assert_close(mixed, _rows_alone(model, ids, TASKS), atol=1e-5, rtol=1e-5)
    assert torch.equal(mixed, blocked) and torch.equal(mixed, fixed)
    assert (other - mixed).abs().max() > 1e-4
    with pytest.raises(ValueError, match="pass task_ids"):  # cleared again
        model(ids)


@pytest.mark.parametrize("bad, message", [([0, 3, 1], "has 3 task"), ([-1, 0, 0], "holds -1"),
                                          ([0.5, 1.0, 0.0], "integer"), ([0, 1], "2 entries")])
def test_bad_task_ids_fail_clearly(bad, message):
    model = _poly()
    with pytest.raises(ValueError, match=message):
        model(sample_ids(), task_ids=torch.tensor(bad))


@pytest.mark.parametrize("make", [_poly, _mpt])
def test_generate_with_task_ids_and_beams(make):
    model, ids = make(), sample_ids()
    mask = torch.ones_like(ids)
    with torch.no_grad(), dt.use_task_ids(model, TASKS):
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        beams = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, num_beams=2,
                               num_return_sequences=2, pad_token_id=0)  # 6 rows: each row's task repeated
    for i in range(3):
        with torch.no_grad(), dt.use_task_ids(model, TASKS[i:i + 1]):
            alone = model.generate(ids[i:i + 1], attention_mask=mask[i:i + 1], max_new_tokens=4, do_sample=False,
                                   pad_token_id=0)
            alone_beams = model.generate(ids[i:i + 1], attention_mask=mask[i:i + 1], max_new_tokens=4,
                                         do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
        assert torch.equal(greedy[i], alone[0])
        assert torch.equal(beams[2 * i:2 * i + 2], alone_beams)


def test_per_row_adapter_routing_keeps_each_rows_task():
    base, ids = tiny_model("llama"), sample_ids()
    model = _poly(model=copy.deepcopy(base), name="a")
    _poly(model=model, name="b")
    randomize_adapter(model, seed=9)
    with torch.no_grad():
        expected = []
        for name in ("a", "b"):
            dt.set_adapter(model, name)
            expected.append(model(ids, task_ids=TASKS).logits)
        with dt.adapter_per_row(model, ["b", None, "a"]):
            routed = model(ids, task_ids=TASKS).logits
    torch.testing.assert_close(routed[0], expected[1][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routed[1], base(ids[1:2]).logits[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routed[2], expected[0][2], atol=1e-6, rtol=1e-5)


def test_poly_on_gpt2_conv1d():  # deltatune wraps GPT-2's Conv1D too (PEFT's Poly takes nn.Linear only)
    model, ids = _poly("gpt2"), sample_ids()
    with torch.no_grad():
        mixed = model(ids, task_ids=TASKS).logits
    torch.testing.assert_close(mixed, _rows_alone(model, ids, TASKS), atol=1e-5, rtol=1e-5)


def test_hooks_go_with_the_last_task_routed_adapter():
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    hooks = len(model._forward_pre_hooks), len(model._forward_hooks)
    _poly(model=model, name="p")
    dt.add_adapter(model, dt.MultitaskPromptTuningConfig(num_virtual_tokens=2, num_tasks=3), "m")
    dt.delete_adapter(model, "p")
    assert hasattr(model, TASKS_ATTR)  # the multitask prompts still need them
    dt.set_adapter(model, "m")
    with torch.no_grad():
        model(sample_ids(), task_ids=TASKS)
    dt.delete_adapter(model, "m")
    assert not hasattr(model, TASKS_ATTR)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    with pytest.raises(ValueError, match="no task-routed adapter"):
        dt.set_task_ids(model, 0)


def test_a_failed_source_init_leaves_no_hooks(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(FileNotFoundError):
        dt.add_adapter(model, dt.MultitaskPromptTuningConfig(
            num_virtual_tokens=2, prompt_tuning_init="ONLY_SOURCE_SHARED",
            prompt_tuning_init_state_dict_path=str(tmp_path / "missing.safetensors")))
    assert not hasattr(model, TASKS_ATTR) and not model._forward_pre_hooks
    with pytest.raises(ValueError, match="safetensors"):  # never unpickled
        dt.add_adapter(model, dt.MultitaskPromptTuningConfig(
            num_virtual_tokens=2, prompt_tuning_init="ONLY_SOURCE_SHARED",
            prompt_tuning_init_state_dict_path=str(tmp_path / "source.bin")))


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="PolyConfig.n_splits"):
        dt.PolyConfig(n_splits=0)
    with pytest.raises(ValueError, match="PolyConfig.poly_type"):
        dt.PolyConfig(poly_type="mhr")
    with pytest.raises(ValueError, match="n_splits=3 must divide"):
        dt.add_adapter(tiny_model("llama"), dt.PolyConfig(n_splits=3, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="prompt_tuning_init_state_dict_path"):
        dt.MultitaskPromptTuningConfig(prompt_tuning_init="EXACT_SOURCE_TASK")
    with pytest.raises(ValueError, match="MultitaskPromptTuningConfig.num_ranks"):
        dt.MultitaskPromptTuningConfig(num_ranks=0)


@pytest.mark.parametrize("make", [_poly, _mpt])
def test_unload_leaves_no_hooks(make):
    model = make()
    plain = dt.unload(model, merge=False)
    assert not hasattr(plain, TASKS_ATTR) and not plain._forward_pre_hooks and not plain._forward_hooks
    with torch.no_grad():
        assert torch.equal(plain(sample_ids()).logits, tiny_model("llama")(sample_ids()).logits)
