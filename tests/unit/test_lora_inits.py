"""LoRA's other initialisations: orthogonal, MiCA, LoftQ, and the conversion of a base-changing
initialisation to a plain LoRA adapter on save."""

import copy
import json

import pytest
import torch

import deltatune as dt
from deltatune.adapters.low_rank.lora_inits.loftq import loftq_decompose, loftq_error, quantize_weight
from deltatune.quant import Linear4bit, Linear8bit
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_llama_64, tiny_model


def _add(base, **kwargs):
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.LoraConfig(**{"r": 4, "lora_alpha": 8, **kwargs}))
    return model


# ----- orthogonal ------------------------------------------------------------------------------------
def test_orthogonal_starts_at_zero_update_with_nonzero_factors():
    base = tiny_model("llama")
    model = _add(base, target_modules="all-linear", init_lora_weights="orthogonal")
    ids = sample_ids()
    # B @ A is zero in exact arithmetic; float32 rounding of the two products leaves ~1e-8
    torch.testing.assert_close(eval_logits(model, ids), eval_logits(base, ids), atol=1e-6, rtol=0)
    layer = model.model.layers[0].mlp.up_proj
    A, B = layer.factors("default")
    assert A.abs().min() > 0 and B.abs().max() > 0
    assert (B @ A).abs().max() < 1e-6
    assert all(p.requires_grad for p in (A, B))


def test_orthogonal_needs_an_even_rank():
    with pytest.raises(ValueError, match="even rank"):
        _add(tiny_model("llama"), r=3, target_modules=["q_proj"], init_lora_weights="orthogonal")


# ----- MiCA ------------------------------------------------------------------------------------------
def test_mica_b_holds_minor_singular_directions_and_stays_frozen():
    base = tiny_model("llama")
    model = _add(base, target_modules="all-linear", init_lora_weights="mica")
    ids = sample_ids()
    assert torch.equal(eval_logits(model, ids), eval_logits(base, ids))  # A = 0 exactly
    layer = model.model.layers[1].self_attn.o_proj
    A, B = layer.factors("default")
    assert torch.count_nonzero(A) == 0 and A.requires_grad
    U, _, _ = torch.linalg.svd(base.model.layers[1].self_attn.o_proj.weight, full_matrices=False)
    torch.testing.assert_close(B, U[:, -4:])
    assert not B.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n for n in trainable)
    # training moves A only
    before = B.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert torch.equal(B, before) and torch.count_nonzero(A) > 0


def test_mica_frozen_b_survives_save_and_trainable_load(tmp_path):
    base = tiny_model("gpt2")
    model = _add(base, target_modules=["c_attn", "wte"], fan_in_fan_out=True, init_lora_weights="mica")
    randomize_adapter(model)
    dt.save_adapter(model, tmp_path)
    again = dt.load_adapter(copy.deepcopy(base), tmp_path, trainable=True)
    ids = sample_ids()
    assert torch.equal(eval_logits(again, ids), eval_logits(model, ids))
    trainable = {n for n, p in again.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("lora_B" in n or "lora_embedding_B" in n for n in trainable)
    assert any("lora_embedding_A" in n for n in trainable)


def test_mica_refuses_a_rank_above_the_layer():
    with pytest.raises(ValueError, match="mica.*too large"):
        _add(tiny_model("llama"), r=20, target_modules=["k_proj"], init_lora_weights="mica")


def test_mica_on_an_nf4_base_uses_the_dequantized_weight():
    from deltatune.quant import QuantizeConfig, quantize_model

    quantized = quantize_model(tiny_model("llama"), QuantizeConfig(quant_type="nf4"))
    dt.add_adapter(quantized, dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="mica"))
    layer = quantized.model.layers[0].self_attn.q_proj
    U, _, _ = torch.linalg.svd(layer.base_layer.dequantize(), full_matrices=False)
    torch.testing.assert_close(layer.factors("default")[1], U[:, -4:])


# ----- config ----------------------------------------------------------------------------------------
def test_sub_configs_get_peft_defaults_and_are_checked():
    cfg = dt.LoraConfig(init_lora_weights="eva")
    assert cfg.eva_config == {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100,
                              "whiten": False, "adjust_scaling_factors": True}
    assert dt.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 8}).loftq_config == \
        {"loftq_bits": 8, "loftq_iter": 1}
    assert dt.LoraConfig(loftq_config={"loftq_bits": 4}).loftq_config == {}  # unused: dropped, as PEFT does
    with pytest.raises(ValueError, match="loftq_config must be given"):
        dt.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match=r"eva_config\['rho'\] must be a number >= 1"):
        dt.LoraConfig(init_lora_weights="eva", eva_config={"rho": 0.5})
    with pytest.raises(ValueError, match="corda_config has unknown key"):
        dt.LoraConfig(init_lora_weights="corda", corda_config={"method": "ipm"})
    with pytest.raises(ValueError, match=r"loftq_bits'\] must be 4 \(NF4\) or 8"):
        dt.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 3})
    with pytest.raises(ValueError, match="init_lora_weights='nope' is not supported"):
        dt.LoraConfig(init_lora_weights="nope")


def test_sub_configs_round_trip_through_files(tmp_path):
    model = _add(tiny_llama_64(), target_modules=["q_proj"], init_lora_weights="loftq",
                 loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    dt.save_adapter(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2} and data["init_lora_weights"] == "loftq"
    assert data["eva_config"] is None and data["corda_config"] is None and data["lora_ga_config"] is None
    assert dt.read_adapter_config(tmp_path).loftq_config == {"loftq_bits": 4, "loftq_iter": 2}


# ----- LoftQ -----------------------------------------------------------------------------------------
def test_loftq_error_is_below_plain_qlora_and_falls_with_iterations(capsys):
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    qlora = loftq_error(weight, quantize_weight(weight, 4), torch.zeros(8, 128), torch.zeros(64, 8))
    errors = [loftq_error(weight, *loftq_decompose(weight, 4, 8, iters)) for iters in (1, 2, 5)]
    with capsys.disabled():
        print(f"\nLoftQ ||W - Q - BA||_F on a 64x128 Gaussian, r=8, NF4: QLoRA init {qlora:.3f}, LoftQ 1/2/5 "
              f"iterations {errors[0]:.3f}/{errors[1]:.3f}/{errors[2]:.3f} "
              f"({100 * (1 - errors[0] / qlora):.1f}% / {100 * (1 - errors[2] / qlora):.1f}% smaller)")
    assert errors[0] < qlora and errors[2] < errors[1] < errors[0]


def test_loftq_quantizes_the_base_and_lowers_the_output_error():
    from deltatune.quant import QuantizeConfig, quantize_model

    base = tiny_llama_64()
    model = _add(base, r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights="loftq",
                 loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, Linear4bit) and layer.base_layer.quant_state.nested is None
    assert dt.trainable_parameters(model)[0] > 0
    qlora = copy.deepcopy(base)
    quantize_model(qlora, QuantizeConfig(quant_type="nf4", double_quant=False))
    ids = sample_ids()
    plain = eval_logits(base, ids)
    loftq_gap = (eval_logits(model, ids) - plain).abs().mean()
    qlora_gap = (eval_logits(qlora, ids) - plain).abs().mean()
    assert loftq_gap < qlora_gap
    with dt.disable_adapters(model):  # the base alone is now the quantized weight
        assert (eval_logits(model, ids) - plain).abs().max() > 0


def test_loftq_8bit_on_gpt2_conv1d():
    base = tiny_model("gpt2")
    model = _add(base, r=4, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                 init_lora_weights="loftq", loftq_config={"loftq_bits": 8, "loftq_iter": 1})
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer.base_layer, Linear8bit) and not layer.transposed
    weight = base.transformer.h[0].attn.c_attn.weight.T
    A, B = layer.factors("default")
    rebuilt = layer.base_layer.dequantize() + B @ A
    assert (rebuilt - weight).norm() < (layer.base_layer.dequantize() - weight).norm()
    ids = sample_ids()
    torch.testing.assert_close(eval_logits(model, ids), eval_logits(base, ids), atol=1e-2, rtol=0)


def test_loftq_refuses_a_quantized_base():
    from deltatune.quant import QuantizeConfig, quantize_model

    quantized = quantize_model(tiny_llama_64(), QuantizeConfig(quant_type="nf4"))
    with pytest.raises(ValueError, match="full-precision weights"):
        dt.add_adapter(quantized, dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="loftq",
                                                loftq_config={"loftq_bits": 4}))


# ----- conversion to a plain LoRA on the original base ----------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_base_changing_init_converts_to_plain_lora_on_the_original_base(init, tmp_path):
    base = tiny_llama_64()
    extra = {"loftq_config": {"loftq_bits": 4, "loftq_iter": 2}} if init == "loftq" else {}
    model = _add(base, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                 init_lora_weights=init, **extra)
    ids = sample_ids()
    init_gap = (eval_logits(model, ids) - eval_logits(base, ids)).abs().max().item()
    dt.save_adapter(model, tmp_path / "initial")
    randomize_adapter(model)  # stands for training
    trained = eval_logits(model, ids)
    dt.save_adapter(model, tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "initial")
    data = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert (data["r"], data["lora_alpha"], data["init_lora_weights"]) == (8, 8, True)
    converted = dt.load_adapter(copy.deepcopy(base), tmp_path / "plain")
    gap = (eval_logits(converted, ids) - trained).abs().max().item()
    # exact split (PiSSA, OLoRA): float rounding only; LoftQ keeps its own quantization error
    assert gap <= (1e-4 if init != "loftq" else 2 * init_gap + 1e-4), (gap, init_gap)


def test_conversion_refuses_a_mismatched_initial_adapter(tmp_path):
    base = tiny_model("llama")
    model = _add(base, target_modules=["q_proj"], init_lora_weights="pissa")
    other = _add(base, target_modules=["v_proj"], init_lora_weights="pissa")
    dt.save_adapter(other, tmp_path / "other")
    with pytest.raises(ValueError, match="is missing"):
        dt.save_adapter(model, tmp_path / "x", path_initial_model_for_weight_conversion=tmp_path / "other")


@pytest.mark.parametrize("init", ["eva", "corda", "lora_ga"])
def test_data_initialisations_are_refused_for_new_adapters_but_their_files_load(init, tmp_path):
    base = tiny_model("llama")
    with pytest.raises(NotImplementedError, match="add_lora_from_data"):
        _add(base, target_modules=["q_proj"], init_lora_weights=init)
    from deltatune.lora_from_data import add_lora_from_data

    with pytest.raises(ValueError, match="does not read data"):
        add_lora_from_data(copy.deepcopy(base), dt.LoraConfig(init_lora_weights="pissa"), [])
    model = _add(base, target_modules=["q_proj"], init_lora_weights=False)
    dt.save_adapter(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "init_lora_weights": init}))
    loaded = dt.load_adapter(copy.deepcopy(base), tmp_path)
    assert dt.read_adapter_config(tmp_path).init_lora_weights == init
    ids = sample_ids()
    assert torch.equal(eval_logits(loaded, ids), eval_logits(model, ids))


@pytest.mark.parametrize("init", ["mica", "eva", "corda", "lora_ga"])
def test_train_accepts_an_initialisation_flag(init, tmp_path, default_tokenizer):
    """``deltatune train --lora.init-lora-weights INIT``: data-driven ones read the first training
    batches; the run trains and writes PEFT's init value."""
    from deltatune.train import load_config, train
    from tiny_models import tiny_chat_model_dir, word_meaning_data

    model_dir = tiny_chat_model_dir(tmp_path / "model", default_tokenizer)
    data = word_meaning_data(tmp_path / "data.jsonl", 48)
    out = tmp_path / "run"
    summary = train(load_config(None, {"model": str(model_dir), "data.path": str(data), "batch_size": 4,
                                       "max_steps": 8, "eval_steps": 4, "seed": 3, "output_dir": str(out),
                                       "lora.init_lora_weights": init, "lora.r": 4}), log=lambda *_: None)
    assert summary["final_validation_loss"] < summary["initial_validation_loss"]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] == init


# ----- LoRA-GA ---------------------------------------------------------------------------------------
def _lora_ga(base, arch="llama", **kwargs):
    from deltatune.lora_from_data import add_lora_from_data

    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    model = copy.deepcopy(base)
    batches = [dict(input_ids=sample_ids(seed=s), labels=sample_ids(seed=s)) for s in (1, 2)]
    config = dt.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": "lora_ga",
                              "fan_in_fan_out": arch == "gpt2", **kwargs})
    return add_lora_from_data(model, config, batches)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_ga_starts_unchanged_and_splits_the_weight_exactly(arch):
    base = tiny_model(arch)
    model = _lora_ga(base, arch)
    ids = sample_ids()
    torch.testing.assert_close(eval_logits(model, ids), eval_logits(base, ids), atol=1e-5, rtol=0)
    key = "transformer.h.0.attn.c_attn" if arch == "gpt2" else "model.layers.0.self_attn.q_proj"
    layer, original = model.get_submodule(key), base.get_submodule(key).weight
    A, B = layer.factors("default")
    assert torch.count_nonzero(A) > 0 and torch.count_nonzero(B) > 0
    rebuilt = layer.canonical(layer.base_layer.weight) + layer.delta_weight("default")
    torch.testing.assert_close(rebuilt, layer.canonical(original), atol=1e-6, rtol=0)
    config = dt.adapter_ops.get_state(model).configs["default"]
    assert config.init_lora_weights == "lora_ga" and config.lora_ga_config["direction"] == "ArB2r"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(p.grad is None for p in model.parameters())


def test_lora_ga_converts_to_plain_lora_on_the_original_base(tmp_path):
    base = tiny_model("llama")
    model = _lora_ga(base)
    dt.save_adapter(model, tmp_path / "initial")
    randomize_adapter(model)
    ids = sample_ids()
    trained = eval_logits(model, ids)
    dt.save_adapter(model, tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "initial")
    converted = dt.load_adapter(copy.deepcopy(base), tmp_path / "plain")
    torch.testing.assert_close(eval_logits(converted, ids), trained, atol=1e-4, rtol=0)


def test_lora_ga_refuses_a_quantized_base():
    from deltatune.quant import QuantizeConfig, quantize_model

    quantized = quantize_model(tiny_model("llama"), QuantizeConfig(quant_type="nf4"))
    with pytest.raises(ValueError, match="full-precision gradients"):
        _lora_ga(quantized)


# ----- EVA -------------------------------------------------------------------------------------------
def _eva_batches(label_mask_first=0):
    batches = []
    for s in (1, 2, 3):
        ids = sample_ids(seed=s, batch=4, length=12)
        labels = ids.clone()
        labels[:, :label_mask_first] = -100
        batches.append(dict(input_ids=ids, labels=labels))
    return batches


def _eva(base, batches, **kwargs):
    from deltatune.lora_from_data import add_lora_from_data

    model = copy.deepcopy(base)
    config = dt.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj", "down_proj"],
                              "init_lora_weights": "eva", **kwargs})
    return add_lora_from_data(model, config, batches)


def _layer_inputs(base, key, batches, skip_first):
    rows = []
    handle = base.get_submodule(key).register_forward_hook(lambda m, i, o: rows.append(i[0][:, skip_first:]))
    with torch.no_grad():
        for batch in batches:
            base(input_ids=batch["input_ids"])
    handle.remove()
    return torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).double()


@pytest.mark.parametrize("skip", [0, 5])
def test_eva_a_rows_are_the_top_principal_directions_of_the_labelled_inputs(skip):
    base = tiny_model("llama")
    batches = _eva_batches(label_mask_first=skip)
    model = _eva(base, batches, eva_config={"rho": 1.0})
    ids = sample_ids()
    assert torch.equal(eval_logits(model, ids), eval_logits(base, ids))  # B = 0
    for key in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        x = _layer_inputs(base, key, batches, skip)
        _, _, Vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        A, B = model.get_submodule(key).factors("default")
        assert torch.count_nonzero(B) == 0
        # the same directions up to sign: |A Vᵀ| is the identity
        torch.testing.assert_close((A.double() @ Vh[: A.shape[0]].T).abs(), torch.eye(A.shape[0], dtype=torch.float64),
                                   atol=1e-4, rtol=0)


def test_eva_redistributes_the_rank_budget_and_records_it():
    base = tiny_model("llama")
    model = _eva(base, _eva_batches(), eva_config={"rho": 2.0})
    config = dt.adapter_ops.get_state(model).configs["default"]
    layers = {k: m for k, m in model.named_modules() if hasattr(m, "lora_A") and m.has_adapter("default")}
    ranks = {k: m.r["default"] for k, m in layers.items()}
    assert sum(ranks.values()) == 4 * 6 and max(ranks.values()) <= 8  # the budget, each layer at most r·rho
    for key, layer in layers.items():
        assert ranks[key] == config.rank_pattern.get(key, 4)
        # adjust_scaling_factors: alpha follows the rank, so the scale stays alpha / r = 2
        assert layer.scaling["default"] == pytest.approx(2.0)
    assert config.init_lora_weights == "eva" and config.eva_config["rho"] == 2.0


def test_eva_whiten_divides_by_the_root_singular_values():
    base = tiny_model("llama")
    plain = _eva(base, _eva_batches(), eva_config={"rho": 1.0})
    white = _eva(base, _eva_batches(), eva_config={"rho": 1.0, "whiten": True})
    key = "model.layers.0.self_attn.o_proj"
    A, W = plain.get_submodule(key).factors("default")[0], white.get_submodule(key).factors("default")[0]
    x = _layer_inputs(base, key, _eva_batches(), 0)
    S = torch.linalg.svdvals(x - x.mean(0))[: A.shape[0]].float()
    torch.testing.assert_close(W, A / S.sqrt().unsqueeze(1), atol=1e-4, rtol=1e-4)


# ----- CorDA -----------------------------------------------------------------------------------------
def _corda(base, method="ipm", arch="llama"):
    from deltatune.lora_from_data import add_lora_from_data

    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "down_proj"]
    batches = [dict(input_ids=sample_ids(seed=s, batch=1, length=16)) for s in range(1, 6)]
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
                           fan_in_fan_out=arch == "gpt2", corda_config={"corda_method": method})
    return add_lora_from_data(copy.deepcopy(base), config, batches)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_splits_the_weight_along_its_covariance_directions(method):
    base = tiny_model("llama")
    model = _corda(base, method)
    ids = sample_ids()
    torch.testing.assert_close(eval_logits(model, ids), eval_logits(base, ids), atol=1e-5, rtol=0)
    key = "model.layers.0.self_attn.q_proj"
    layer, original = model.get_submodule(key), base.get_submodule(key).weight
    torch.testing.assert_close(layer.base_layer.weight + layer.delta_weight("default"), original, atol=1e-6, rtol=0)
    config = dt.adapter_ops.get_state(model).configs["default"]
    assert config.init_lora_weights == "corda" and config.corda_config["corda_method"] == method


def test_ipm_takes_the_larger_components_than_kpm():
    base = tiny_model("llama")
    key = "model.layers.1.mlp.down_proj"
    ipm = _corda(base, "ipm").get_submodule(key).delta_weight("default").norm()
    kpm = _corda(base, "kpm").get_submodule(key).delta_weight("default").norm()
    assert ipm > kpm > 0


def test_corda_converts_to_plain_lora_on_the_original_base(tmp_path):
    base = tiny_model("gpt2")
    model = _corda(base, arch="gpt2")
    dt.save_adapter(model, tmp_path / "initial")
    randomize_adapter(model)
    ids = sample_ids()
    trained = eval_logits(model, ids)
    dt.save_adapter(model, tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "initial")
    converted = dt.load_adapter(copy.deepcopy(base), tmp_path / "plain")
    torch.testing.assert_close(eval_logits(converted, ids), trained, atol=1e-4, rtol=0)
