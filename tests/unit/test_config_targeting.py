"""LoraConfig fields mean what they mean in PEFT; targeting rules follow PEFT's."""

import json
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.adapters import LoraLayer
from deltatune.config.base import CONFIG_REGISTRY, TargetedConfig
from deltatune.targeting import find_targets
from tiny_models import tiny_model


def _targets(config, arch="llama"):
    return [k for k, _ in find_targets(tiny_model(arch), config)]


def test_list_targets_match_suffixes():
    assert _targets(dt.LoraConfig(target_modules=["q_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_regex_targets_match_whole_names():
    assert _targets(dt.LoraConfig(target_modules=r".*1\.self_attn\.(q|k)_proj")) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    assert _targets(dt.LoraConfig(target_modules="q_proj")) == []  # fullmatch, not search


def test_all_linear_leaves_out_the_head_and_exclusions_apply():
    names = _targets(dt.LoraConfig(target_modules="all-linear", exclude_modules=["down_proj"]))
    assert len(names) == 2 * 6 and "lm_head" not in names and not any("down_proj" in n for n in names)
    gpt2 = _targets(dt.LoraConfig(target_modules="all-linear"), "gpt2")
    assert "lm_head" not in gpt2 and "transformer.h.0.attn.c_attn" in gpt2


def test_layers_to_transform():
    cfg = dt.LoraConfig(target_modules=["v_proj"], layers_to_transform=1, layers_pattern="layers")
    assert _targets(cfg) == ["model.layers.1.self_attn.v_proj"]
    assert _targets(dt.LoraConfig(target_modules=["c_attn"], layers_to_transform=[0]), "gpt2") == [
        "transformer.h.0.attn.c_attn"]


def test_rank_and_alpha_patterns():
    model = tiny_model("llama")
    dt.add_adapter(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3}))
    q0, q1 = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
    assert (q0.r["default"], q1.r["default"]) == (4, 2)
    assert model.model.layers[0].self_attn.v_proj.scaling["default"] == 3 / 4
    assert q1.scaling["default"] == 8 / 2


def test_default_targets_by_architecture():
    model = tiny_model("gpt2")
    dt.add_adapter(model, dt.LoraConfig())
    assert isinstance(model.transformer.h[0].attn.c_attn, LoraLayer)


def test_clear_errors_for_bad_targets():
    with pytest.raises(ValueError, match="matched no module.*some module names"):
        dt.add_adapter(tiny_model(), dt.LoraConfig(target_modules=["nope"]))
    with pytest.raises(TypeError, match="model.norm.*LlamaRMSNorm.*supported"):
        dt.add_adapter(tiny_model(), dt.LoraConfig(target_modules=["norm"]))
    model = tiny_model()
    with pytest.raises(ValueError, match="already exists"):
        dt.add_adapter(model, dt.LoraConfig(target_modules=["q_proj"]))
        dt.add_adapter(model, dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no dots"):
        dt.add_adapter(tiny_model(), dt.LoraConfig(target_modules=["q_proj"]), name="a.b")


@pytest.mark.parametrize("field,value", [("r", 0), ("lora_dropout", 1.5), ("bias", "some"),
                                         ("init_lora_weights", "loftq"), ("rank_pattern", {"q": -1})])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dt.LoraConfig(**{field: value})


def test_config_round_trip_keeps_unknown_fields():
    cfg = dt.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj"], use_dora=True, rank_pattern={"q": 4})
    data = cfg.to_dict()
    data["some_future_field"] = {"x": 1}
    with pytest.warns(UserWarning, match="some_future_field"):
        back = dt.config_from_dict(json.loads(json.dumps(data)))
    assert back == cfg and back.to_dict() == data


def test_config_errors():
    with pytest.raises(ValueError, match="peft_type"):
        dt.config_from_dict({"r": 4})
    with pytest.raises(ValueError, match="not supported"):
        dt.config_from_dict({"peft_type": "UNKNOWN"})
    # LoRA on expert parameters is supported (tests/unit/test_moe_experts.py); what PEFT refuses there is refused
    assert dt.config_from_dict({"peft_type": "LORA", "target_parameters": ["mlp.experts.down_proj"]}) \
        .target_parameters == ["mlp.experts.down_proj"]
    with pytest.raises(ValueError, match="lora_dropout"):
        dt.config_from_dict({"peft_type": "LORA", "target_parameters": ["mlp.experts.down_proj"], "lora_dropout": 0.1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's own passive fields do not warn
        dt.config_from_dict(dt.LoraConfig().to_dict())


def test_long_target_lists_are_recorded_by_shortest_suffixes_like_peft():
    import copy

    peft = pytest.importorskip("peft")
    import deltatune as dt
    from tiny_models import tiny_model

    base = tiny_model("t5")  # 32 linear layers: PEFT shortens lists of 20 or more
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules="all-linear"))
    ours = copy.deepcopy(base)
    dt.add_adapter(ours, dt.LoraConfig(r=2, target_modules="all-linear"))
    recorded = dt.adapter_ops.get_state(ours).configs["default"].to_dict()["target_modules"]
    assert sorted(recorded) == sorted(theirs.peft_config["default"].target_modules) == ["k", "o", "q", "v", "wi", "wo"]
    full = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    listed = copy.deepcopy(base)
    dt.add_adapter(listed, dt.LoraConfig(r=2, target_modules=full))
    assert sorted(dt.adapter_ops.get_state(listed).configs["default"].to_dict()["target_modules"]) == sorted(recorded)


_OMITTING = sorted((cls for cls in CONFIG_REGISTRY.values()
                    if issubclass(cls, TargetedConfig) and {"exclude_modules", "modules_to_save"} & set(cls.omitted_fields)),
                   key=lambda cls: cls.peft_type)


@pytest.mark.parametrize("cls", _OMITTING, ids=lambda cls: cls.peft_type)
def test_targeting_fields_a_method_cannot_save_are_refused(cls):
    # Saving drops a field the method's PEFT files lack, so accepting it would change the adapter on reload.
    omitted = [name for name in ("exclude_modules", "modules_to_save") if name in cls.omitted_fields]
    for name in omitted:
        with pytest.raises(ValueError, match=f"{cls.__name__}.{name}: PEFT's {cls.peft_type} files have no such"):
            cls(**{name: ["q_proj"]})
    assert len(_OMITTING) >= 15  # the check covers the catalogue, not one class
