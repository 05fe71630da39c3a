"""PEFT parity for Super-Tuning (sparse entries picked by magnitude) and its Supra hybrid (plus a
LoRA pair): files loaded both ways give the same logits, the files carry PEFT's keys, shapes,
dtypes and config fields, both tools pick the same support (ties, counts, smallest entries
too), one backward step gives PEFT's gradients, and merging matches PEFT's merged model.

PEFT 0.21.2 wraps only ``nn.Linear`` for Super-Tuning, so GPT-2's cases adapt its one linear,
the (tied) output head; its ``Conv1D`` layers are refused by both tools."""

import copy

import pytest
import torch

import deltatune as dt
from peft_roundtrip import (assert_same_files, assert_same_gradients, deltatune_file_to_peft, load_peft_file,
                            peft_file_to_deltatune)
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore:save_precomputed_indices=False"),  # PEFT's note on its config
              pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`"),
              pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")]  # PEFT on GPT-2's head

ATOL = 1e-5

# case -> (architecture, fields (the same in PEFT and deltatune))
CASES = {
    "super-llama": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], sparsity=0.9)),
    "super-bottom-qwen2": ("qwen2", dict(target_modules="all-linear", sparsity=0.8, select_top=False)),
    "super-no-indices-qwen2": ("qwen2", dict(target_modules=["q_proj", "up_proj"], sparsity=0.95,
                                             save_precomputed_indices=False)),
    "supra-llama": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], sparsity=0.9, r=4)),
    "supra-bottom-llama": ("llama", dict(target_modules="all-linear", sparsity=0.97, select_top=False, r=2,
                                         lora_alpha=3, lora_dropout=0.1)),
    "supra-qwen2": ("qwen2", dict(target_modules=["k_proj", "o_proj", "gate_proj"], sparsity=0.85, r=2)),
    "supra-no-indices-bottom-qwen2": ("qwen2", dict(target_modules=["v_proj"], sparsity=0.9, r=3,
                                                    select_top=False, save_precomputed_indices=False)),
    "super-head-gpt2": ("gpt2", dict(target_modules=["lm_head"], sparsity=0.9)),
    "supra-bottom-head-gpt2": ("gpt2", dict(target_modules=["lm_head"], sparsity=0.95, r=2, select_top=False)),
}


def _peft_model(base, case, **extra):
    return peft.get_peft_model(copy.deepcopy(base), peft.SupertuningConfig(**CASES[case][1], **extra))


def _dt_model(base, case, **extra):
    return dt.add_adapter(copy.deepcopy(base), dt.SupertuningConfig(**CASES[case][1], **extra))


def _saving_adapter_only(model):
    """PEFT saves a targeted output head's base weight beside the adapter unless told not to."""
    save = model.save_pretrained
    model.save_pretrained = lambda folder, **kw: save(folder, save_embedding_layers=False, **kw)
    return model


def _supports(model) -> dict[str, torch.Tensor]:
    """Module name -> the default adapter's flat positions, in either tool."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "supertuning_indices") and hasattr(module, "supertuning_values"):
            out[name.removeprefix("base_model.model.")] = module.supertuning_indices["default"]
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_deltatune_loads(case, tmp_path, parity_results):
    base = tiny_model(CASES[case][0])
    theirs = _saving_adapter_only(_peft_model(base, case, init_weights=False))
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
def test_files_and_supports_are_peft_s(case, tmp_path):
    base = tiny_model(CASES[case][0])
    theirs, ours = _saving_adapter_only(_peft_model(base, case)), _dt_model(base, case)
    mine, other = assert_same_files(theirs, ours, tmp_path, CASES[case][1] | {"lora_alpha": None, "r": None})
    for key in [k for k in other if k.endswith("supertuning_indices")]:
        assert torch.equal(mine[key], other[key]), key  # the same positions, in the same order
    saved = any(k.endswith("supertuning_indices") for k in other)
    assert saved == CASES[case][1].get("save_precomputed_indices", True)
    supports = _supports(theirs)
    assert supports and supports.keys() == _supports(ours).keys()
    assert all(torch.equal(_supports(ours)[k], v) for k, v in supports.items())


@pytest.mark.parametrize("select_top", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_supports_with_many_ties_are_peft_s(select_top, dtype):
    """Weights with few distinct magnitudes (many ties at the cut), in float32 and bfloat16."""
    base = tiny_model("llama")
    with torch.no_grad():
        for module in base.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_((module.weight * 20).round() / 20)
    base = base.to(dtype)
    fields = dict(target_modules="all-linear", sparsity=0.7, select_top=select_top, r=2)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.SupertuningConfig(**fields))
    ours = dt.add_adapter(copy.deepcopy(base), dt.SupertuningConfig(**fields))
    supports = _supports(theirs)
    assert len(supports) == 14
    for key, positions in _supports(ours).items():
        assert positions.dtype == torch.int32 and torch.equal(positions, supports[key]), key
    weight = base.model.layers[0].mlp.down_proj.weight.abs().flatten()
    assert int(weight.numel() * (1 - 0.7)) == 614  # PEFT's count: the float product, truncated
    assert len(weight.unique()) < 20  # many ties at the cut indeed


GRADIENT_CASES = ["super-llama", "super-bottom-qwen2", "supra-llama", "supra-qwen2", "super-head-gpt2",
                  "supra-bottom-head-gpt2"]


@pytest.mark.parametrize("case", GRADIENT_CASES)
def test_gradients_of_one_step_equal_peft(case, tmp_path):
    base, ids = tiny_model(CASES[case][0]), sample_ids()
    theirs = _saving_adapter_only(_peft_model(base, case, init_weights=False))
    randomize_adapter(theirs)
    ours = load_peft_file(base, theirs, tmp_path, trainable=True)
    assert_same_gradients(theirs, ours, ids, atol=1e-6, rtol=1e-4, nonzero=True)


MERGE_CASES = ["super-llama", "super-bottom-qwen2", "supra-llama", "supra-bottom-llama", "supra-qwen2"]


@pytest.mark.parametrize("case", MERGE_CASES)
def test_merge_round_trips_and_matches_peft(case, tmp_path, parity_results):
    base, ids = tiny_model(CASES[case][0]), sample_ids()
    theirs = _peft_model(base, case, init_weights=False)
    randomize_adapter(theirs)
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
    diff = (eval_logits(merged, ids) - eval_logits(their_merged, ids)).abs().max().item()
    parity_results[f"{case}: merged vs PEFT merged"] = diff


def test_seeded_random_start_is_peft_s():
    base = tiny_model("llama")
    torch.manual_seed(5)
    theirs = _peft_model(base, "supra-llama", init_weights=False)
    torch.manual_seed(5)
    ours = _dt_model(base, "supra-llama", init_weights=False)
    their_tensors = {k.replace(".default", ""): v for k, v in theirs.named_parameters() if v.requires_grad}
    our_tensors = {k.replace(".default", ""): v for k, v in ours.named_parameters() if v.requires_grad}
    assert {"base_model.model." + k for k in our_tensors} == set(their_tensors)
    assert all(torch.equal(v, their_tensors["base_model.model." + k]) for k, v in our_tensors.items())


def test_conv1d_is_refused_as_peft_refuses_it():
    base = tiny_model("gpt2")
    with pytest.raises(TypeError, match="only `torch.nn.Linear`"):
        peft.get_peft_model(copy.deepcopy(base), peft.SupertuningConfig(target_modules=["c_attn"]))
    with pytest.raises(TypeError, match="Super-Tuning wraps nn.Linear layers .* not a Conv1D"):
        dt.add_adapter(copy.deepcopy(base), dt.SupertuningConfig(target_modules=["c_attn"]))


def test_on_a_4bit_base_the_support_comes_from_the_dequantized_weight(tmp_path, parity_results):
    """deltatune on an NF4 base picks the entries PEFT picks on the same weights dequantized
    (PEFT's Super-Tuning cannot score a 4-bit base: it would rank the packed bytes)."""
    from deltatune.quant import QuantizeConfig, dequantize_model, quantize_model

    quantized = quantize_model(tiny_model("llama"), QuantizeConfig(quant_type="nf4"))
    reference = dequantize_model(copy.deepcopy(quantized))
    fields = dict(target_modules=["q_proj", "down_proj"], sparsity=0.9, r=2, select_top=False,
                  save_precomputed_indices=False)
    theirs = peft.get_peft_model(copy.deepcopy(reference), peft.SupertuningConfig(**fields, init_weights=False))
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)  # no positions in the file: deltatune picks them on the 4-bit base
    ours = dt.load_adapter(copy.deepcopy(quantized), tmp_path)
    supports = _supports(theirs)
    assert all(torch.equal(_supports(ours)[k], v) for k, v in supports.items())
    ids = sample_ids()
    diff = (eval_logits(ours, ids) - eval_logits(theirs, ids)).abs().max().item()
    parity_results["supra-nf4-llama (PEFT on the dequantized base): PEFT file -> deltatune"] = diff
    assert diff <= 1e-4


def test_config_fields_checks_and_sizes():
    assert dt.SupertuningConfig(r=4).lora_alpha == 8  # 2·r, written to the file as PEFT writes it
    assert dt.SupertuningConfig().lora_alpha is None
    for bad, match in [(dict(sparsity=1.0), "SupertuningConfig.sparsity"), (dict(sparsity=-0.1), "sparsity"),
                       (dict(r=0), "SupertuningConfig.r"), (dict(lora_alpha=8), "lora_alpha is set but r is None"),
                       (dict(r=2, lora_dropout=1.0), "lora_dropout"), (dict(select_top="yes"), "select_top"),
                       (dict(exclude_modules=["q_proj"]), "exclude_modules")]:
        with pytest.raises(ValueError, match=match):
            dt.SupertuningConfig(**bad)
    with pytest.raises(ValueError, match="leaves no entry to train"):  # 32·32·(1 - 0.9995) < 1
        dt.add_adapter(tiny_model("llama"), dt.SupertuningConfig(target_modules=["q_proj"], sparsity=0.9995))


def test_positions_outside_the_weight_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    base = tiny_model("llama")
    dt.save_adapter(_dt_model(base, "super-llama"), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.supertuning_indices"))
    tensors[key][0] = 32 * 32
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="positions outside the 32x32 weight"):
        dt.load_adapter(copy.deepcopy(base), tmp_path)
    tensors[key][0] = 0
    save_file({**tensors, key: tensors[key].to(torch.int16)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="positions must be int32"):
        dt.load_adapter(copy.deepcopy(base), tmp_path)
    save_file({**tensors, key: tensors[key].to(torch.int64)}, tmp_path / "adapter_model.safetensors")
    assert dt.load_adapter(copy.deepcopy(base), tmp_path).model.layers[0].self_attn.q_proj \
        .supertuning_indices["default"].dtype == torch.int32  # int64 positions are narrowed
