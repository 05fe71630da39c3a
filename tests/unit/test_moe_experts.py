"""LoRA on mixture-of-experts models: the warning for expert weights no target reaches, the
target_experts / train_router presets, the routers' load statistics, and merge round trips into
the fused expert tensors (tiny random Qwen3-MoE, Mixtral, gpt-oss and OLMoE models)."""

import copy
import json
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.adapter_ops import get_state
from deltatune.adapters.low_rank.moe_experts import ExpertLoraLayer, expert_layers
from deltatune.targeting_experts import UntargetedExpertsWarning, expert_targets, router_targets
from deltatune.train import ConfigError, load_config, train
from deltatune.train.config import LoraOptions
from deltatune.train.moe import RouterLoad, apply_expert_presets
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model, word_meaning_data
from tiny_moe import EXPERT_TARGETS, MOE_ARCHS, tiny_moe, tiny_moe_dir

ROUTERS = {"qwen3_moe": ["mlp.gate"], "mixtral": ["mlp.gate"], "gpt_oss": ["mlp.router"], "olmoe": ["mlp.gate"]}


def _add(model, **fields):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dt.add_adapter(model, dt.LoraConfig(**fields))
    return [w for w in caught if issubclass(w.category, UntargetedExpertsWarning)]


# ----- the warning ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_attention_only_targets_warn_once_naming_the_expert_weights(arch):
    caught = _add(tiny_moe(arch), r=2, target_modules=["q_proj", "v_proj"])
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "mlp.experts.gate_up_proj (2 layers)" in text and "mlp.experts.down_proj (2 layers)" in text
    assert "4 fused expert weight(s)" in text and "--lora.target-experts" in text


def test_all_linear_keeps_peft_meaning_per_architecture():
    """PEFT on transformers 5 reads "all-linear" on Qwen3-MoE, Mixtral and OLMoE as the former linears,
    experts and router included; gpt-oss has no such reading, so there it adapts attention only and warns."""
    for arch in MOE_ARCHS:
        model = tiny_moe(arch)
        caught = _add(model, r=2, target_modules="all-linear")
        config = get_state(model).configs["default"]
        if arch == "gpt_oss":
            assert len(caught) == 1 and not config.target_parameters and not expert_layers(model)
        else:
            assert not caught
            assert sorted(config.target_parameters) == ["down_proj", "gate.weight", "gate_up_proj"]
            assert config.rank_pattern == {r".*\.gate_up_proj": 4}  # gate and up fused: rank 2r there
            assert sorted(config.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_no_warning_when_experts_are_targeted_or_the_model_is_dense():
    assert not _add(tiny_moe("olmoe"), r=2, target_modules=[], target_parameters=EXPERT_TARGETS)
    assert not _add(tiny_model("llama"), r=2, target_modules="all-linear")
    caught = _add(tiny_moe("mixtral"), r=2, target_modules=[], target_parameters=["mlp.experts.down_proj"])
    assert len(caught) == 1 and "gate_up_proj" in str(caught[0].message) and "down_proj (" not in str(caught[0].message)


# ----- presets and the router ----------------------------------------------------------------
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_target_experts_preset_names_the_fused_weights(arch):
    model = tiny_moe(arch)
    assert expert_targets(model) == EXPERT_TARGETS and router_targets(model) == ROUTERS[arch]
    lines = []
    config = apply_expert_presets(dt.LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.05),
                                  LoraOptions(target_experts=True), model, lines.append)
    assert config.target_parameters == EXPERT_TARGETS and config.lora_dropout == 0.0
    assert any("lora_dropout 0.05 -> 0" in line for line in lines)
    dt.add_adapter(model, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".experts.lora_A." in n for n in trainable) and any("q_proj.lora_A" in n for n in trainable)
    assert not any(n.endswith(("gate.weight", "router.weight", "router.bias")) for n in trainable)  # router frozen


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_train_router_preset_trains_a_saved_copy(arch, tmp_path):
    base = tiny_moe(arch)
    model = copy.deepcopy(base)
    config = apply_expert_presets(dt.LoraConfig(r=2, target_modules=[]),
                                  LoraOptions(target_experts=True, train_router=True), model)
    assert config.modules_to_save == ROUTERS[arch]
    dt.add_adapter(model, config)
    router = ROUTERS[arch][0].split(".")[-1]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(f"{router}.modules_to_save.default.weight" in n for n in trainable)
    assert not any(f"{router}.original_module" in n for n in trainable)
    with torch.no_grad():  # a trained router changes the routing
        for layer in model.model.layers:
            getattr(layer.mlp, router).modules_to_save["default"].weight.mul_(-1)
    dt.save_adapter(model, tmp_path)
    keys = json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    assert keys == ROUTERS[arch]
    again = dt.load_adapter(copy.deepcopy(base), tmp_path)
    ids = sample_ids()
    torch.testing.assert_close(eval_logits(again, ids), eval_logits(model, ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_a_router_trained_in_full_takes_no_lora_under_all_linear(arch):
    # all-linear reads the router's weight as a target on these models; trained in full it takes none
    model = tiny_moe(arch)
    config = apply_expert_presets(dt.LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.0),
                                  LoraOptions(train_router=True), model)
    dt.add_adapter(model, config)
    saved = get_state(model).configs["default"]
    assert saved.target_parameters and not any(p.endswith("gate.weight") for p in saved.target_parameters)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("gate.modules_to_save.default.weight" in n for n in trainable)
    assert any("experts" in n and "lora_A" in n for n in trainable)


def test_quantized_expert_weights_are_refused_by_name():
    model = tiny_moe("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.data.to(torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match="gate_up_proj is torch.uint8"):
        dt.add_adapter(model, dt.LoraConfig(r=2, target_modules=[], target_parameters=["gate_up_proj"]))


def test_presets_refuse_dense_models_and_other_methods():
    with pytest.raises(ConfigError, match="no fused expert weights"):
        apply_expert_presets(dt.LoraConfig(r=2), LoraOptions(target_experts=True), tiny_model("llama"))
    with pytest.raises(ConfigError, match="no router"):
        apply_expert_presets(dt.LoraConfig(r=2), LoraOptions(train_router=True), tiny_model("llama"))
    with pytest.raises(ConfigError, match="presets of LoRA"):
        apply_expert_presets(dt.LoHaConfig(r=2), LoraOptions(target_experts=True), tiny_moe("olmoe"))


def test_training_default_dropout_gives_way_where_targets_reach_parameters():
    lines = []
    config = apply_expert_presets(dt.LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.05),
                                  LoraOptions(), tiny_moe("qwen3_moe"), lines.append)
    assert config.lora_dropout == 0.0 and "lora_dropout 0.05 -> 0" in lines[0]
    kept = apply_expert_presets(dt.LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.05),
                                LoraOptions(), tiny_moe("gpt_oss"))
    assert kept.lora_dropout == 0.05  # no parameter targets there


# ----- router statistics ---------------------------------------------------------------------
def test_router_load_counts_tokens_per_expert_in_eval_passes():
    model = tiny_moe("qwen3_moe")
    load = RouterLoad.attach(model)
    chosen = []
    handles = [layer.mlp.gate.register_forward_hook(lambda m, a, out: chosen.append(out[2].reshape(-1)))
               for layer in model.model.layers]
    ids = sample_ids()
    model.train()
    model(ids)
    assert load.take() == {}  # training passes are not counted
    chosen.clear()
    eval_logits(model, ids)
    stats = load.take()
    for h in handles:
        h.remove()
    per_layer = [torch.bincount(c, minlength=4).float() for c in chosen]
    assert stats["router_tokens"] == ids.numel() * 2 * 2  # tokens x top-2 x 2 layers
    assert stats["router_max_over_mean_load"] == pytest.approx(max((c.max() / c.mean()).item() for c in per_layer))
    cv = sum((c.std(unbiased=False) / c.mean()).item() for c in per_layer) / 2
    assert stats["router_load_cv"] == pytest.approx(cv)
    assert stats["router_max_over_mean_load"] >= 1.0 and 0.0 <= stats["router_idle_expert_share"] <= 1.0
    assert load.take() == {} and load.last == stats  # counting restarts; the last summary stays
    assert "busiest expert" in RouterLoad.describe(stats)
    assert RouterLoad.attach(tiny_model("llama")) is None


def test_train_logs_router_load_and_trains_the_experts(tmp_path, default_tokenizer):
    folder = tiny_moe_dir(tmp_path / "model", default_tokenizer, "olmoe")
    data = word_meaning_data(tmp_path / "data.jsonl", 24)
    lines = []
    out = tmp_path / "run"
    summary = train(load_config(None, {"model": str(folder), "data.path": str(data), "batch_size": 4,
                                       "max_steps": 4, "eval_steps": 2, "seed": 3, "output_dir": str(out),
                                       "lora.target_modules": ["q_proj"], "lora.target_experts": True}),
                    log=lines.append)
    assert summary["final_validation_loss"] < summary["initial_validation_loss"]
    assert summary["router_load"]["router_tokens"] > 0 and any("router load:" in str(line) for line in lines)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("router_load_cv" in r for r in records if "eval_loss" in r and r["step"] > 0)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == EXPERT_TARGETS and config["lora_dropout"] == 0.0


# ----- merging into the fused tensors ----------------------------------------------------------
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_merge_unmerge_round_trip_is_exact(arch):
    base = tiny_moe(arch)
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERT_TARGETS))
    randomize_adapter(model)
    ids = sample_ids()
    unmerged = eval_logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dt.merge(model, verbose=False)
    experts = model.model.layers[0].mlp.experts
    assert not torch.equal(experts.base_layer.gate_up_proj, before["model.layers.0.mlp.experts.base_layer.gate_up_proj"])
    torch.testing.assert_close(eval_logits(model, ids), unmerged, atol=1e-5, rtol=0)
    with dt.disable_adapters(model):  # merged adapters set aside: the base exactly
        assert torch.equal(eval_logits(model, ids), eval_logits(base, ids))
    torch.testing.assert_close(eval_logits(model, ids), unmerged, atol=1e-5, rtol=0)
    dt.unmerge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # bit for bit
    assert torch.equal(eval_logits(model, ids), unmerged)


def test_unload_and_delete_give_the_plain_model_back():
    base = tiny_moe("gpt_oss")
    ids = sample_ids()
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.LoraConfig(r=2, target_modules=[], target_parameters=EXPERT_TARGETS))
    randomize_adapter(model)
    adapted = eval_logits(model, ids)
    merged = dt.unload(model, merge=True, verbose=False)
    assert not any(isinstance(m, ExpertLoraLayer) for m in merged.modules())
    assert set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(eval_logits(merged, ids), adapted, atol=1e-5, rtol=0)
    other = copy.deepcopy(base)
    dt.add_adapter(other, dt.LoraConfig(r=2, target_modules=[], target_parameters=EXPERT_TARGETS))
    dt.delete_adapter(other, "default")
    assert not any(isinstance(m, ExpertLoraLayer) for m in other.modules())
    assert torch.equal(eval_logits(other, ids), eval_logits(base, ids))


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_adapted_weight_equals_the_per_expert_reference(arch):
    """The batched fold (one baddbmm for all experts) equals a plain loop over experts of B_e A_e."""
    model = tiny_moe(arch)
    dt.add_adapter(model, dt.LoraConfig(r=3, lora_alpha=5, target_modules=[], target_parameters=EXPERT_TARGETS))
    randomize_adapter(model)
    layer = model.model.layers[0].mlp.experts
    folded = layer.adapted_weights(["default"])
    for p in EXPERT_TARGETS:
        name = p.rsplit(".", 1)[-1]
        weight = getattr(layer.base_layer, name)
        A = layer.lora_A["default"][name].weight.view(weight.shape[0], 3, -1)  # (E, r, in)
        B = layer.lora_B["default"][name].weight  # (out, r*E), columns rank-major
        for e in range(weight.shape[0]):
            delta = B[:, e::weight.shape[0]] @ A[e] * (5 / 3)  # (out, in)
            expected = weight[e] + (delta.T if arch == "gpt_oss" else delta)
            torch.testing.assert_close(folded[name][e], expected, atol=1e-6, rtol=1e-6)


# ----- bad input ------------------------------------------------------------------------------
def test_bad_target_parameters_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="LoraConfig.target_parameters must be a list"):
        dt.LoraConfig(target_parameters="mlp.experts.down_proj")
    with pytest.raises(ValueError, match="LoraConfig.init_lora_weights='pissa'"):
        dt.LoraConfig(target_parameters=EXPERT_TARGETS, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="only plain LoRA adapts parameters"):
        dt.AdaLoraConfig(target_r=2, init_r=4, total_step=10, target_parameters=EXPERT_TARGETS)
    with pytest.raises(ValueError, match=r"matched no parameter.*mlp\.experts\.gate_up_proj"):
        dt.add_adapter(tiny_moe("olmoe"), dt.LoraConfig(target_modules=[], target_parameters=["experts.w9"]))
    with pytest.raises(ValueError, match=r"\['gate_proj'\] cannot be adapted without \['up_proj'\]"):
        dt.add_adapter(tiny_moe("qwen3_moe"), dt.LoraConfig(target_modules=["gate_proj"]))
    model = tiny_moe("mixtral")  # a file made for rank 2 does not load into rank 3 tensors, by key
    dt.add_adapter(model, dt.LoraConfig(r=2, target_modules=[], target_parameters=EXPERT_TARGETS))
    dt.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(ValueError, match=r"experts.*lora_A.weight' has shape \(8, 32\) in the file but \(12, 32\)"):
        dt.load_adapter(tiny_moe("mixtral"), tmp_path)
    with pytest.raises(ValueError, match="matched no parameter"):  # an expert adapter on a dense model
        dt.load_adapter(tiny_model("llama"), tmp_path)


def test_weighted_combination_refuses_parameter_adapters_as_peft_does():
    model = tiny_moe("olmoe")
    fields = dict(r=2, target_modules=[], target_parameters=EXPERT_TARGETS)
    dt.add_adapter(model, dt.LoraConfig(**fields), name="a")
    dt.add_adapter(model, dt.LoraConfig(**fields), name="b")
    with pytest.raises(ValueError, match="does not combine LoRA on parameters"):
        dt.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], name="ab")
