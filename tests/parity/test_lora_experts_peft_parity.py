"""PEFT parity for LoRA on the fused expert weights of mixture-of-experts models (PEFT's
``target_parameters``) on tiny random Qwen3-MoE, Mixtral, gpt-oss (transposed experts with biases)
and OLMoE models: files loaded both ways give the same logits, the files carry PEFT's keys
(nested ``base_layer`` steps), shapes, dtypes and config fields, one backward step gives PEFT's
gradients, merging matches PEFT's merged model with an exact unmerge, PEFT's refusals (DoRA,
dropout, ...) are deltatune's, and several adapters route per row through one batch."""

import copy
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.adapter_ops import get_state
from deltatune.io import adapter_tensors
from peft_roundtrip import (assert_same_files, assert_same_gradients, deltatune_file_to_peft, load_peft_file,
                            merged_vs_peft_merged, peft_file_to_deltatune)
from tiny_models import eval_logits, randomize_adapter, sample_ids
from tiny_moe import EXPERT_TARGETS, MOE_ARCHS, tiny_moe

peft = pytest.importorskip("peft")

ATOL = 1e-5

# case -> (architecture, LoraConfig fields given to both tools)
CASES = {
    **{f"experts-{arch}": (arch, dict(r=2, lora_alpha=4, target_modules=[], target_parameters=EXPERT_TARGETS))
       for arch in MOE_ARCHS},
    # attention modules beside the experts; rsLoRA; a rank and alpha pattern on one expert weight
    "experts-attn-rslora-qwen3_moe": ("qwen3_moe", dict(
        r=3, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_TARGETS,
        rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 7})),
    "gate-up-only-gpt_oss": ("gpt_oss", dict(r=4, lora_alpha=8, target_modules=["o_proj"],
                                             target_parameters=["mlp.experts.gate_up_proj"])),
    # target_modules None: PEFT fills Mixtral's defaults (q_proj, v_proj); OLMoE has none
    "default-modules-mixtral": ("mixtral", dict(r=2, target_parameters=EXPERT_TARGETS)),
    "default-modules-olmoe": ("olmoe", dict(r=2, init_lora_weights="gaussian", target_parameters=EXPERT_TARGETS)),
    # PEFT's reading of module names on transformers 5 MoE models: "all-linear" and the former expert
    # linears' names become parameter targets (router weight included; gate/up pairs at 2r, 2 alpha)
    "all-linear-qwen3_moe": ("qwen3_moe", dict(r=2, lora_alpha=3, target_modules="all-linear")),
    "all-linear-gpt_oss": ("gpt_oss", dict(r=2, target_modules="all-linear")),  # no rewrite: attention only
    "former-names-mixtral": ("mixtral", dict(r=2, target_modules=["q_proj", "w1", "w3", "w2"])),
    "former-regex-olmoe": ("olmoe", dict(r=2, target_modules=r".*\.(k_proj|gate_proj|up_proj|gate)")),
    # the router trained as a saved copy beside LoRA on the experts
    "router-saved-olmoe": ("olmoe", dict(r=2, target_modules=[], target_parameters=EXPERT_TARGETS,
                                         modules_to_save=["mlp.gate"])),
    "router-saved-gpt_oss": ("gpt_oss", dict(r=2, target_modules=[], target_parameters=EXPERT_TARGETS,
                                             modules_to_save=["mlp.router"])),
}




def _peft_model(base, case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CASES[case][1]))


def _dt_model(base, case, name="default"):
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dt.add_adapter(model, dt.LoraConfig(**CASES[case][1]), name=name)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_fresh_adapter_is_the_base_and_counts_match(case):
    base = tiny_moe(CASES[case][0])
    ours, theirs = _dt_model(base, case), _peft_model(base, case)
    ids = sample_ids()
    assert torch.equal(eval_logits(ours, ids), eval_logits(base, ids))
    assert dt.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_deltatune_loads(case, tmp_path, parity_results):
    base = tiny_moe(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    diff = parity_results[f"lora-experts {case}: PEFT file -> deltatune"] = peft_file_to_deltatune(
        base, theirs, tmp_path, quiet=True)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_saves_peft_loads(case, tmp_path, parity_results):
    base = tiny_moe(CASES[case][0])
    ours = _dt_model(base, case)
    randomize_adapter(ours)
    diff = parity_results[f"lora-experts {case}: deltatune file -> PEFT"] = deltatune_file_to_peft(
        base, ours, tmp_path, quiet=True)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_files(case, tmp_path):
    base = tiny_moe(CASES[case][0])
    fields = ["target_modules", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
              "modules_to_save", "lora_dropout"]
    if case != "all-linear-gpt_oss":  # PEFT leaves an unset target_parameters out of its file (so does deltatune)
        fields.append("target_parameters")
    ours, _ = assert_same_files(_peft_model(base, case), _dt_model(base, case), tmp_path, fields)
    # PEFT's nesting: the first parameter in the module's order is the inner wrapper
    if "down_proj" in str(CASES[case][1].get("target_parameters")):
        assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in ours
        assert "base_model.model.model.layers.0.mlp.experts.lora_B.weight" in ours


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_gradients(case, tmp_path):
    base = tiny_moe(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    ours = load_peft_file(base, theirs, tmp_path, trainable=True, quiet=True)  # the same adapter values
    # both named by their file keys
    assert_same_gradients(
        theirs, ours, sample_ids(), atol=1e-5, rtol=1e-4, nonzero=True,
        their_name=lambda n: n.replace(".modules_to_save.default", "").replace(".default", ""),
        our_name=lambda n: n, our_tensors=lambda m: adapter_tensors(m, "default"))


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if "router" not in c])
def test_merge_matches_peft_and_unmerges_exactly(case, tmp_path, parity_results):
    base = tiny_moe(CASES[case][0])
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    diff = parity_results[f"lora-experts {case}: merged vs PEFT merged"] = merged_vs_peft_merged(
        base, theirs, tmp_path)
    assert diff <= 1e-4


@pytest.mark.parametrize("field, value, reason", [
    ("use_dora", True, "use_dora=True"),
    ("lora_dropout", 0.1, "lora_dropout != 0"),
    ("lora_bias", True, "lora_bias=True"),
    ("fan_in_fan_out", True, "fan_in_fan_out"),
])
def test_refused_as_peft_refuses(field, value, reason):
    base = tiny_moe("qwen3_moe")
    fields = dict(r=2, target_modules=[], target_parameters=EXPERT_TARGETS, **{field: value})
    with pytest.raises(ValueError, match=reason):
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}=.*{reason}"):
        dt.LoraConfig(**fields)


def test_second_adapter_must_target_the_same_parameters():
    base = tiny_moe("mixtral")
    first = dict(r=2, target_modules=[], target_parameters=EXPERT_TARGETS)
    second = dict(r=2, target_modules=[], target_parameters=["mlp.experts.down_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**first))
    with pytest.raises(ValueError, match="all adapters must target the same set"):
        theirs.add_adapter("other", peft.LoraConfig(**second))
    ours = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(**first))
    with pytest.raises(ValueError, match="all adapters must target the same set"):
        dt.add_adapter(ours, dt.LoraConfig(**second), name="other")
    dt.add_adapter(ours, dt.LoraConfig(**{**first, "r": 3}), name="same")  # the same set is fine
    assert sorted(get_state(ours).configs) == ["default", "same"]


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_second_peft_adapter_loads_beside_the_first(arch, tmp_path):
    base = tiny_moe(arch)
    case = f"experts-{arch}"
    theirs = _peft_model(base, case)
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path / "a")
    ours = dt.load_adapter(_dt_model(base, case, name="first"), tmp_path / "a", name="second")
    dt.set_adapter(ours, "second")
    ids = sample_ids()
    torch.testing.assert_close(eval_logits(ours, ids), eval_logits(theirs, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_per_row_routing_through_the_experts(arch, parity_results):
    """Rows [a, base, b] in one batch give each row what its adapter gives alone (PEFT refuses mixed
    batches on parameters: "lora.ParamWrapper does not support mixed adapter batches yet")."""
    base = tiny_moe(arch)
    model = copy.deepcopy(base)
    fields = dict(r=2, target_modules=["q_proj"], target_parameters=EXPERT_TARGETS, init_lora_weights=False)
    dt.add_adapter(model, dt.LoraConfig(**fields), name="a")
    dt.add_adapter(model, dt.LoraConfig(**{**fields, "r": 3}), name="b")
    ids = sample_ids()
    expected = []
    for name in ("a", None, "b"):
        dt.set_adapter(model, name)
        expected.append(eval_logits(model, ids))
    dt.set_adapter(model, ["a", "b"])
    with dt.adapter_per_row(model, ["a", None, "b"]):
        routed = eval_logits(model, ids)
    assert (expected[0] - expected[2]).abs().max() > 1e-2  # the adapters really differ
    worst = max((routed[i] - expected[i][i]).abs().max().item() for i in range(3))
    parity_results[f"lora-experts per-row {arch}: routed vs alone"] = worst
    assert worst <= ATOL
    with dt.adapter_per_row(model, ["b", "b", "a", "a", None, None]):  # a batch of whole multiples
        repeated = eval_logits(model, ids.repeat_interleave(2, dim=0))
    torch.testing.assert_close(repeated[1], expected[2][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(repeated[4], expected[1][2], atol=ATOL, rtol=0)


def test_generate_routes_per_row():
    base = tiny_moe("qwen3_moe")
    model = copy.deepcopy(base)
    fields = dict(r=2, target_modules=[], target_parameters=EXPERT_TARGETS, init_lora_weights=False)
    dt.add_adapter(model, dt.LoraConfig(**fields), name="a")
    ids = sample_ids(batch=2)
    with dt.adapter_per_row(model, [None, "a"]):
        routed = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    alone = model.generate(ids[1:], max_new_tokens=4, do_sample=False, pad_token_id=0)
    with dt.disable_adapters(model):
        plain = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(routed[1:], alone) and torch.equal(routed[:1], plain)
