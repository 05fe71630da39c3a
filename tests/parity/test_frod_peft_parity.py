"""PEFT parity for FRoD: the shared bases, sparse positions and per-layer U that deltatune computes
from the base weights are PEFT's bit for bit, files loaded both ways give the same logits (also
files without projections, recomputed on load), the files carry PEFT's keys, shapes, dtypes and
config fields, one backward step gives PEFT's gradients, merging matches PEFT's merged model with
an exact unmerge, and rows routed to two adapters read from PEFT files give PEFT's logits of each."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from peft_roundtrip import (assert_same_files, assert_same_gradients, deltatune_file_to_peft, load_peft_file,
                            merged_vs_peft_merged, peft_file_to_deltatune)
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")

ATOL = 1e-5

# case -> (architecture, fields given to both tools); λ and S are randomised by the tests
CASES = {
    # runtime_offload_base_weight: PEFT's placement choice (the MetaMathQA experiments set it); no value changes
    "frod-llama": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], runtime_offload_base_weight=True)),
    "frod-rate-seed-ridge-qwen2": ("qwen2", dict(target_modules="all-linear", sparse_rate=0.05,
                                                 projection_prng_key=3, regularization_alpha=1e-2)),
    "frod-gpt2": ("gpt2", dict(target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True, sparse_rate=0.02)),
    # no projections in the file: bases and positions recomputed from the base weights and the seed
    "frod-no-projection-llama": ("llama", dict(target_modules=["k_proj", "o_proj", "up_proj"],
                                               save_projection=False, projection_prng_key=11)),
    # one layer: the stacked down_proj weights are wider than tall, so V is their SVD's right basis
    "frod-one-layer-svd-llama": ("llama", dict(target_modules=["down_proj", "q_proj"], layers_to_transform=[1])),
    # encoder and decoder blocks share numbers: a role's basis comes from the later (decoder) weights, as in PEFT
    "frod-t5": ("t5", dict(target_modules=["q", "v", "wo"])),
    "frod-bias-dropout-qwen2": ("qwen2", dict(target_modules=["q_proj", "v_proj", "gate_proj"], bias="frod_only",
                                              frod_dropout=0.1)),
}


def _fields(case):
    return dict(CASES[case][1], progressbar=False)


def _peft_model(base, case):
    return peft.get_peft_model(copy.deepcopy(base), peft.FrodConfig(**_fields(case)))


def _dt_model(base, case):
    return dt.add_adapter(copy.deepcopy(base), dt.FrodConfig(**_fields(case)))


def _no_dropout(*models):
    for model in models:  # dropout draws differ between tools; compare without it
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0


def _layers(model):
    return {k.removeprefix("base_model.model."): m for k, m in model.named_modules() if hasattr(m, "frod_U")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_deltatune_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    diff = parity_results[f"{case}: PEFT file -> deltatune"] = peft_file_to_deltatune(base, theirs, tmp_path,
                                                                                      min_change=1e-3, quiet=True)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_saves_peft_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    ours = _dt_model(base, case)
    randomize_adapter(ours, seed=7)
    diff = parity_results[f"{case}: deltatune file -> PEFT"] = deltatune_file_to_peft(base, ours, tmp_path,
                                                                                      min_change=1e-3, quiet=True)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_and_frozen_factors_are_peft_s_bit_for_bit(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs_model, ours_model = _peft_model(base, case), _dt_model(base, case)
    ours, theirs = assert_same_files(theirs_model, ours_model, tmp_path, _fields(case))
    projections = [k for k in theirs if k.startswith("base_model.frod_")]
    assert bool(projections) == CASES[case][1].get("save_projection", True)
    assert any(k.endswith(".frod_lambda_s_values") for k in theirs)
    for key in theirs:  # bases, positions and the starting λ (from the same QR, eigh and solve)
        assert torch.equal(ours[key], theirs[key]), key
    mine = _layers(ours_model)
    for key, module in _layers(theirs_model).items():
        assert torch.equal(mine[key].frod_U["default"], module.frod_U["default"]), key
    ids = sample_ids()
    assert torch.equal(eval_logits(ours_model, ids), eval_logits(theirs_model, ids))


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
    ours = load_peft_file(base, theirs, tmp_path, trainable=True, quiet=True)
    _no_dropout(theirs, ours)
    assert_same_gradients(theirs, ours, sample_ids(), atol=1e-5, rtol=1e-4, nonzero=True)


@pytest.mark.parametrize("arch, fields", [
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
])
def test_rows_routed_to_two_peft_files_give_each_file_s_logits(arch, fields, tmp_path, parity_results):
    base, ids = tiny_model(arch), sample_ids()
    expected, model = {}, copy.deepcopy(base)
    for name, seed in (("a", 2), ("b", 5)):
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.FrodConfig(**fields, progressbar=False))
        randomize_adapter(theirs, seed=seed)
        theirs.save_pretrained(tmp_path / name)
        expected[name] = eval_logits(theirs, ids)
        dt.load_adapter(model, tmp_path / name, name=name)
    with dt.adapter_per_row(model, ["b", None, "a"]):
        routed = eval_logits(model, ids)
    diff = max((routed[0] - expected["b"][0]).abs().max().item(), (routed[2] - expected["a"][2]).abs().max().item())
    parity_results[f"frod-{arch}: rows routed to two PEFT files"] = diff
    assert diff <= ATOL
    assert torch.equal(routed[1], eval_logits(base, ids)[1])  # the row without an adapter is the base's


def test_two_active_adapters_add_their_changes_as_peft_does(tmp_path):
    base, ids = tiny_model("llama"), sample_ids()
    fields = dict(target_modules=["q_proj", "v_proj"], progressbar=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.FrodConfig(**fields))
    theirs.add_adapter("other", peft.FrodConfig(**fields))
    randomize_adapter(theirs)
    theirs.base_model.set_adapter(["default", "other"])
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path)
    dt.load_adapter(ours, tmp_path / "other", name="other")
    dt.set_adapter(ours, ["default", "other"])
    assert (eval_logits(ours, ids) - eval_logits(theirs, ids)).abs().max() <= ATOL


def test_init_weights_false_draws_peft_s_start_and_loads_in_peft(tmp_path):
    base, ids = tiny_model("llama"), sample_ids()
    fields = dict(target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False, progressbar=False)
    torch.manual_seed(0)
    ours = dt.add_adapter(copy.deepcopy(base), dt.FrodConfig(**fields))
    torch.manual_seed(0)  # the same global draws, layer by layer: S's values, then λ's noise
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.FrodConfig(**fields))
    mine, peft_tensors = assert_same_files(theirs, ours, tmp_path, fields)
    assert all(torch.equal(mine[k], peft_tensors[k]) for k in mine)
    assert (eval_logits(ours, ids) - eval_logits(base, ids)).abs().max() > 1e-3
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert (eval_logits(loaded, ids) - eval_logits(ours, ids)).abs().max() <= ATOL


def test_starts_as_the_rebuilt_base_and_trains_only_lambda_and_s():
    base, ids = tiny_model("llama"), sample_ids()
    model = dt.add_adapter(copy.deepcopy(base), dt.FrodConfig(target_modules=["q_proj", "v_proj"]))
    assert (eval_logits(model, ids) - eval_logits(base, ids)).abs().max() <= 1e-5  # U diag(λ) Vᵀ = W up to rounding
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".frod_lambda_l.default" in n or ".frod_lambda_s_values.default" in n for n in trainable)
    # 2 blocks × (q, v): λ of 32 and int(32 · 32 · 0.01) = 10 positions of S each
    assert dt.trainable_parameters(model)[0] == 4 * (32 + 10)


def test_a_bfloat16_base_gives_peft_s_dtypes_and_logits(tmp_path):
    base = tiny_model("llama").to(torch.bfloat16)
    fields = dict(target_modules=["q_proj", "v_proj", "down_proj"], progressbar=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.FrodConfig(**fields))
    ours, peft_tensors = assert_same_files(theirs, dt.add_adapter(copy.deepcopy(base), dt.FrodConfig(**fields)),
                                           tmp_path, fields)
    assert all(v.dtype == torch.bfloat16 for k, v in ours.items() if ".frod_V." in k)  # the base's dtype
    assert all(v.dtype == torch.float32 for k, v in ours.items() if ".frod_lambda" in k)  # upcast, as PEFT does
    assert all(torch.equal(ours[k], peft_tensors[k]) for k in ours)
    randomize_adapter(theirs)
    loaded = load_peft_file(base, theirs, tmp_path / "random")
    ids = sample_ids()
    assert (eval_logits(loaded, ids).float() - eval_logits(theirs, ids).float()).abs().max() <= 1e-2


def test_on_a_4bit_base_u_comes_from_the_dequantized_weight(tmp_path, parity_results):
    """PEFT cannot decompose a 4-bit layer; deltatune loads PEFT's file made on the same weights
    dequantized, and the rebuilt weights never read the 4-bit base again."""
    from deltatune.quant import QuantizeConfig, dequantize_model, quantize_model

    quantized = quantize_model(tiny_model("llama"), QuantizeConfig(quant_type="nf4"))
    reference = dequantize_model(copy.deepcopy(quantized))
    theirs = peft.get_peft_model(copy.deepcopy(reference), peft.FrodConfig(target_modules=["q_proj", "down_proj"],
                                                                          progressbar=False))
    randomize_adapter(theirs)
    ours = load_peft_file(quantized, theirs, tmp_path)
    ids = sample_ids()
    diff = (eval_logits(ours, ids) - eval_logits(theirs, ids)).abs().max().item()
    parity_results["frod-nf4-llama (PEFT on the dequantized base): PEFT file -> deltatune"] = diff
    assert diff <= 1e-4
    before = eval_logits(ours, ids)
    dt.merge(ours, verbose=False)
    assert (eval_logits(ours, ids) - before).abs().max() <= 1e-4
    dt.unmerge(ours)
    assert torch.equal(eval_logits(ours, ids), before)


def test_no_trained_positions_at_sparse_rate_zero(tmp_path):
    base, ids = tiny_model("llama"), sample_ids()
    fields = dict(target_modules=["q_proj"], sparse_rate=0.0, progressbar=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.FrodConfig(**fields))
    randomize_adapter(theirs)
    ours = load_peft_file(base, theirs, tmp_path)
    assert all(p.numel() == 0 for n, p in ours.named_parameters() if "frod_lambda_s_values" in n)
    assert (eval_logits(ours, ids) - eval_logits(theirs, ids)).abs().max() <= ATOL


def test_save_projection_true_without_projections_is_refused_as_peft_refuses_it(tmp_path):
    base = tiny_model("llama")
    ours = dt.add_adapter(copy.deepcopy(base), dt.FrodConfig(target_modules=["q_proj"]))
    dt.save_adapter(ours, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("base_model.frod_")},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="save_projection=true but no frod_V"):
        dt.load_adapter(copy.deepcopy(base), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "save_projection": False}))
    reloaded = dt.load_adapter(copy.deepcopy(base), tmp_path)  # recomputed from the base: the same adapter
    assert torch.equal(eval_logits(reloaded, sample_ids()), eval_logits(ours, sample_ids()))


@pytest.mark.parametrize("key_end, bad, message", [
    ("frod_s_indices.self_attn_q_proj", lambda t: t + 40, "positions outside S"),
    ("frod_s_indices.self_attn_q_proj", lambda t: t.int(), "torch.int64"),
    ("frod_s_size.self_attn_q_proj", lambda t: t * 2, r"S is \[32, 32\]"),
    ("frod_V.self_attn_q_proj", lambda t: t[:, :8], "shape"),
])
def test_bad_projections_in_a_file_are_refused_by_key(key_end, bad, message, tmp_path):
    base = tiny_model("llama")
    dt.save_adapter(dt.add_adapter(copy.deepcopy(base), dt.FrodConfig(target_modules=["q_proj"])), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model." + key_end
    tensors[key] = bad(tensors[key]).contiguous()
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=message):
        dt.load_adapter(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("make, message", [
    (lambda: dt.FrodConfig(sparse_rate=1.5), "FrodConfig.sparse_rate"),
    (lambda: dt.FrodConfig(sparse_rate=-0.1), "FrodConfig.sparse_rate"),
    (lambda: dt.FrodConfig(regularization_alpha=-1.0), "FrodConfig.regularization_alpha"),
    (lambda: dt.FrodConfig(frod_dropout=1.0), "FrodConfig.frod_dropout"),
    (lambda: dt.FrodConfig(bias="lora_only"), "FrodConfig.bias"),
    (lambda: dt.FrodConfig(projection_prng_key=-1), "FrodConfig.projection_prng_key"),
    (lambda: dt.FrodConfig(save_projection="yes"), "FrodConfig.save_projection"),
    (lambda: dt.FrodConfig(layers_pattern="layers"), "FrodConfig.layers_pattern"),
    (lambda: dt.FrodConfig(exclude_modules=["q_proj"]), "FrodConfig.exclude_modules"),
])
def test_bad_settings_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_non_linear_targets_are_refused():
    with pytest.raises(TypeError, match="FRoD cannot wrap a Embedding"):
        dt.add_adapter(tiny_model("llama"), dt.FrodConfig(target_modules=["embed_tokens"]))
