"""PEFT parity for GraLoRA, Uni-LoRA, DEFT and PEANuT: files loaded both ways give the same
logits, the files carry PEFT's keys, shapes, dtypes and config fields, merging gives PEFT's
merged model (and unmerging restores ours exactly), and one backward step gives PEFT's gradients."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from peft_roundtrip import (assert_same_files, assert_same_gradients, deltatune_file_to_peft, load_peft_file,
                            merged_vs_peft_merged, peft_file_to_deltatune)
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to")

# case -> (architecture, config class name in PEFT, in deltatune, fields,
#          fields added on both sides to start from a random (non-identity) adapter)
CASES = {
    "gralora-llama": ("llama", "GraloraConfig", "GraloraConfig",
                      dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, gralora_k=2, alpha=8),
                      dict(init_weights=False)),
    "gralora-hybrid-qwen2": ("qwen2", "GraloraConfig", "GraloraConfig",
                             dict(target_modules="all-linear", r=8, gralora_k=4, hybrid_r=2, alpha=16,
                                  bias="gralora_only"), dict(init_weights=False)),
    "gralora-gpt2": ("gpt2", "GraloraConfig", "GraloraConfig",
                     dict(target_modules=["c_attn", "c_fc"], r=4, gralora_k=2, hybrid_r=1, fan_in_fan_out=True),
                     dict(init_weights=False)),
    "unilora-llama": ("llama", "UniLoraConfig", "UniLoraConfig",
                      dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, theta_d_length=64), {}),
    "unilora-indices-qwen2": ("qwen2", "UniLoraConfig", "UniLoraConfig",
                              dict(target_modules="all-linear", r=2, theta_d_length=100, proj_seed=7,
                                   save_indices=True, bias="unilora_only"), {}),
    "unilora-gpt2": ("gpt2", "UniLoraConfig", "UniLoraConfig",
                     dict(target_modules=["c_attn", "c_fc"], r=2, theta_d_length=48, fan_in_fan_out=True),
                     dict(init_weights=False)),  # a standard normal vector: GPT-2's small weights need it
    "deft-llama": ("llama", "DeftConfig", "DeftConfig", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4), {}),
    "deft-qr-alpha-qwen2": ("qwen2", "DeftConfig", "DeftConfig",
                            dict(target_modules="all-linear", r=4, decomposition_method="qr", alpha=8,
                                 bias="deft_only"), {}),
    "deft-para-gpt2": ("gpt2", "DeftConfig", "DeftConfig",
                       dict(target_modules=["c_attn", "c_fc"], r=4, para=True, fan_in_fan_out=True), {}),
    "deft-random-gpt2": ("gpt2", "DeftConfig", "DeftConfig",
                         dict(target_modules=["c_attn", "c_proj"], r=40, fan_in_fan_out=True),  # r capped at 32
                         dict(init_weights=False)),
    "peanut-llama": ("llama", "PeanutConfig", "PeanutConfig",
                     dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4), dict(init_weights=False)),
    "peanut-depth2-gelu-qwen2": ("qwen2", "PeanutConfig", "PeanutConfig",
                                 dict(target_modules="all-linear", r=4, depth=2, act_fn="gelu", scaling=2.0),
                                 dict(init_weights=False)),
}
# PEFT's PEANuT wraps nn.Linear only, so there is no GPT-2 (Conv1D) case for it
ATOL = 1e-5


def _peft_model(base, case):
    _, cls, _, kwargs, extra = CASES[case]
    return peft.get_peft_model(copy.deepcopy(base), getattr(peft, cls)(**kwargs, **extra))


def _dt_model(base, case):
    _, _, cls, kwargs, extra = CASES[case]
    model = copy.deepcopy(base)
    dt.add_adapter(model, getattr(dt, cls)(**kwargs, **extra))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_deltatune_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    diff = parity_results[f"{case}: PEFT file -> deltatune"] = peft_file_to_deltatune(base, theirs, tmp_path)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_saves_peft_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    ours = _dt_model(base, case)
    randomize_adapter(ours, seed=7)
    diff = parity_results[f"{case}: deltatune file -> PEFT"] = deltatune_file_to_peft(base, ours, tmp_path)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_have_peft_keys_shapes_dtypes_and_config_fields(case, tmp_path):
    base = tiny_model(CASES[case][0])
    ours, theirs = assert_same_files(_peft_model(base, case), _dt_model(base, case), tmp_path, CASES[case][3])
    # indices and scales drawn from a seed (Uni-LoRA's) are PEFT's values, not just its shapes
    for key in [k for k in theirs if ".unilora_indices_" in k or ".unilora_scales_" in k]:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_model_equals_peft_merged_and_unmerge_is_exact(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    diff = parity_results[f"{case}: merged, deltatune vs PEFT"] = merged_vs_peft_merged(base, theirs, tmp_path)
    assert diff <= ATOL


def _canonical(name):
    """Parameter names without the adapter name; Uni-LoRA's shared vector listed once."""
    name = name.removeprefix("base_model.model.").replace(".default", "")
    return "unilora_theta_d" if name.endswith("unilora_theta_d") else name


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_of_one_step_equal_peft(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    ours = load_peft_file(base, theirs, tmp_path, trainable=True)
    # PEFT holds some factors in nn.Linear modules (GraLoRA's hybrid part, PEANuT's): ".weight"; ours are tensors.
    # atol 1e-5: float32 sums in another order
    assert_same_gradients(theirs, ours, sample_ids(), atol=1e-5, rtol=1e-4,
                          their_name=lambda n: _canonical(n).removesuffix(".weight"), our_name=_canonical)


@pytest.mark.parametrize("make, message", [
    (lambda: dt.GraloraConfig(r=6, gralora_k=4), "GraloraConfig.r"),
    (lambda: dt.GraloraConfig(gralora_k=0), "GraloraConfig.gralora_k"),
    (lambda: dt.GraloraConfig(hybrid_r=-1), "GraloraConfig.hybrid_r"),
    (lambda: dt.GraloraConfig(bias="lora_only"), "GraloraConfig.bias"),
    (lambda: dt.UniLoraConfig(theta_d_length=0), "UniLoraConfig.theta_d_length"),
    (lambda: dt.UniLoraConfig(init_theta_d_bound=0), "UniLoraConfig.init_theta_d_bound"),
    (lambda: dt.UniLoraConfig(exclude_modules=["q_proj"]), "UniLoraConfig.exclude_modules"),
    (lambda: dt.DeftConfig(decomposition_method="svd"), "DeftConfig.decomposition_method"),
    (lambda: dt.DeftConfig(r=0), "DeftConfig.r"),
    (lambda: dt.DeftConfig(bias="lora_only"), "DeftConfig.bias"),
    (lambda: dt.PeanutConfig(depth=-1), "PeanutConfig.depth"),
    (lambda: dt.PeanutConfig(act_fn="nope"), "PeanutConfig.act_fn"),
])
def test_bad_settings_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_gralora_blocks_must_divide_the_layer():
    with pytest.raises(ValueError, match="gralora_k=3 must divide"):
        dt.add_adapter(tiny_model("llama"), dt.GraloraConfig(r=3, gralora_k=3, target_modules=["q_proj"]))


def test_peanut_refuses_gpt2_conv1d_as_peft_does():
    with pytest.raises(TypeError, match="PEANuT cannot wrap a Conv1D"):
        dt.add_adapter(tiny_model("gpt2"), dt.PeanutConfig(r=4, target_modules=["c_attn"]))


def test_unilora_file_with_indices_past_the_vector_is_refused(tmp_path):
    from safetensors.torch import save_file

    base = tiny_model("llama")
    model = _dt_model(base, "unilora-llama")
    dt.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["save_indices"] = True
    dt.save_adapter(dt.add_adapter(copy.deepcopy(base), dt.config_from_dict(config)), tmp_path / "with")
    tensors = load_file(tmp_path / "with" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("unilora_indices_A"))
    tensors[key] = tensors[key] + 1000
    save_file(tensors, tmp_path / "with" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="indices outside theta_d of length 64"):
        dt.load_adapter(copy.deepcopy(base), tmp_path / "with")


def test_deft_starts_as_an_exact_no_op_and_merges_several_adapters_as_forward_applies_them():
    base, ids = tiny_model("llama"), sample_ids()
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.DeftConfig(r=4, target_modules=["q_proj", "down_proj"]), "a")
    assert torch.equal(eval_logits(model, ids), eval_logits(base, ids))
    dt.add_adapter(model, dt.DeftConfig(r=4, decomposition_method="qr", target_modules=["q_proj"]), "b")
    randomize_adapter(model)
    dt.set_adapter(model, ["a", "b"])
    both = eval_logits(model, ids)
    dt.merge(model, verbose=False)  # each ΔW from the unmerged weight, as forward computes them
    torch.testing.assert_close(eval_logits(model, ids), both, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)
    assert torch.equal(eval_logits(model, ids), both)
