"""PEFT parity for PSOFT: the frozen SVD factors (recomputed from the base weight, never saved)
are PEFT's bit for bit, files loaded both ways give the same logits, the files carry PEFT's keys,
shapes, dtypes and config fields, one backward step gives PEFT's gradients, and merging matches
PEFT's merged model with an exact unmerge. PEFT's PSOFT wraps nn.Linear only: no GPT-2 cases."""

import copy

import pytest
import torch

import deltatune as dt
from peft_roundtrip import (assert_same_files, assert_same_gradients, deltatune_file_to_peft, load_peft_file,
                            merged_vs_peft_merged, peft_file_to_deltatune)
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")

ATOL = 1e-5

# case -> (architecture, fields given to both tools); R starts at the identity and is randomised by the tests
CASES = {
    "psoft-llama": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, psoft_alpha=8)),
    "psoft-neumann-eps-dropout-qwen2": ("qwen2", dict(target_modules="all-linear", r=3, use_cayley_neumann=True,
                                                      num_cayley_neumann_terms=4, cayley_neumann_eps=0.1,
                                                      psoft_mag_a=False, psoft_dropout=0.1)),
    "psoft-free-pissa-llama": ("llama", dict(target_modules=["k_proj", "o_proj", "up_proj"], r=5, psoft_alpha=3,
                                             psoft_orth=False, ab_svd_init="pissa_init", psoft_mag_b=False)),
    "psoft-lowrank-qwen2": ("qwen2", dict(target_modules=["q_proj", "gate_proj", "down_proj"], r=4, psoft_alpha=16,
                                          psoft_svd="lowrank", psoft_svd_lowrank_niter=3, random_seed=5)),
}


def _peft_model(base, case):
    return peft.get_peft_model(copy.deepcopy(base), peft.PsoftConfig(**CASES[case][1]))


def _dt_model(base, case):
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.PsoftConfig(**CASES[case][1]))
    return model


def _no_dropout(*models):
    for model in models:  # dropout draws differ between tools; compare without it
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_deltatune_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    diff = parity_results[f"{case}: PEFT file -> deltatune"] = peft_file_to_deltatune(base, theirs, tmp_path,
                                                                                      min_change=1e-3)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_saves_peft_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    ours = _dt_model(base, case)
    randomize_adapter(ours, seed=7)
    diff = parity_results[f"{case}: deltatune file -> PEFT"] = deltatune_file_to_peft(base, ours, tmp_path,
                                                                                      min_change=1e-3)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_have_peft_keys_shapes_dtypes_values_and_config_fields(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs_model, ours_model = _peft_model(base, case), _dt_model(base, case)
    ours, theirs = assert_same_files(theirs_model, ours_model, tmp_path, CASES[case][1])
    assert theirs and all(".psoft_R." in k for k in theirs)  # only R and its vectors: A and B are recomputed
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    # the recomputed SVD factors are PEFT's bits, signs included
    mine = {k: m for k, m in ours_model.named_modules() if hasattr(m, "psoft_A")}
    for key, module in theirs_model.named_modules():
        if hasattr(module, "_psoft_A_cache"):
            layer = mine[key.removeprefix("base_model.model.")]
            assert torch.equal(layer.psoft_A["default"], module._psoft_A_cache["default"]), key
            assert torch.equal(layer.psoft_B["default"], module._psoft_B_cache["default"]), key


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_model_equals_peft_merged_and_unmerge_is_exact(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    diff = parity_results[f"{case}: merged, deltatune vs PEFT"] = merged_vs_peft_merged(base, theirs, tmp_path)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_of_one_step_equal_peft(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    ours = load_peft_file(base, theirs, tmp_path, trainable=True)
    _no_dropout(theirs, ours)
    assert_same_gradients(theirs, ours, sample_ids(), atol=1e-5, rtol=1e-4, nonzero=True)


def test_init_weights_false_is_not_a_no_op_and_loads_in_peft(tmp_path):
    base = tiny_model("llama")
    fields = dict(target_modules=["q_proj", "v_proj"], r=4, init_weights=False)
    ours = dt.add_adapter(copy.deepcopy(base), dt.PsoftConfig(**fields))
    ids = sample_ids()
    assert not torch.equal(eval_logits(ours, ids), eval_logits(base, ids))
    dt.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert (eval_logits(theirs, ids) - eval_logits(ours, ids)).abs().max() <= ATOL


def test_starts_as_a_no_op_and_trains_only_r_and_vectors():
    base, ids = tiny_model("qwen2"), sample_ids()
    model = dt.add_adapter(copy.deepcopy(base), dt.PsoftConfig(target_modules="all-linear", r=4))
    assert (eval_logits(model, ids) - eval_logits(base, ids)).abs().max() <= 1e-5
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".psoft_R.default." in n for n in trainable)
    assert dt.trainable_parameters(model)[0] == 14 * (6 + 4 + 4)  # 14 layers: 6 generator values, 2 vectors


def test_a_bfloat16_base_gives_peft_s_float32_tensors_and_logits(tmp_path):
    base = tiny_model("llama").to(torch.bfloat16)
    fields = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PsoftConfig(**fields))
    ours, _ = assert_same_files(theirs, dt.add_adapter(copy.deepcopy(base), dt.PsoftConfig(**fields)),
                                tmp_path, fields)
    assert all(v.dtype == torch.float32 for v in ours.values())
    randomize_adapter(theirs)
    loaded = load_peft_file(base, theirs, tmp_path / "random")
    ids = sample_ids()
    assert (eval_logits(loaded, ids).float() - eval_logits(theirs, ids).float()).abs().max() <= 1e-2


@pytest.mark.parametrize("make, message", [
    (lambda: dt.PsoftConfig(r=0), "PsoftConfig.r"),
    (lambda: dt.PsoftConfig(psoft_alpha=0), "PsoftConfig.psoft_alpha"),
    (lambda: dt.PsoftConfig(psoft_dropout=1.5), "PsoftConfig.psoft_dropout"),
    (lambda: dt.PsoftConfig(ab_svd_init="olora"), "PsoftConfig.ab_svd_init"),
    (lambda: dt.PsoftConfig(psoft_svd="qr"), "PsoftConfig.psoft_svd"),
    (lambda: dt.PsoftConfig(psoft_svd_lowrank_niter=0), "PsoftConfig.psoft_svd_lowrank_niter"),
    (lambda: dt.PsoftConfig(num_cayley_neumann_terms=0), "PsoftConfig.num_cayley_neumann_terms"),
    (lambda: dt.PsoftConfig(cayley_neumann_eps=1.5), "PsoftConfig.cayley_neumann_eps"),
    (lambda: dt.PsoftConfig(psoft_orth="yes"), "PsoftConfig.psoft_orth"),
    (lambda: dt.PsoftConfig(random_seed="seven"), "PsoftConfig.random_seed"),
])
def test_bad_settings_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_rank_above_the_layer_width_is_refused():
    with pytest.raises(ValueError, match="PsoftConfig.r"):
        dt.add_adapter(tiny_model("llama"), dt.PsoftConfig(target_modules=["k_proj"], r=17))


def test_gpt2_conv1d_is_refused_as_peft_refuses_it():
    with pytest.raises(TypeError, match="PSOFT cannot wrap a Conv1D"):
        dt.add_adapter(tiny_model("gpt2"), dt.PsoftConfig(target_modules=["c_attn"], r=4))
