"""Quantized linear layers and adapters on them: forward/backward, memory, invariants, files, errors."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune import quant
from tiny_models import randomize_adapter, sample_ids, saved_tiny_llama_64

QUANT_TYPES = ["nf4", "fp4", "int8"]


def _layer(quant_type, seed=0, bias=True):
    torch.manual_seed(seed)
    linear = nn.Linear(128, 96, bias=bias)
    cfg = quant.QuantizeConfig(quant_type)
    from deltatune.quant.convert import make_quant_linear

    return linear, make_quant_linear(linear, cfg)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_forward_and_input_gradient_equal_dequantized_linear(quant_type):
    _, layer = _layer(quant_type)
    x = torch.randn(3, 5, 128, requires_grad=True)
    out = layer(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = nn.functional.linear(ref_x, layer.dequantize(), layer.bias)
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-6, rtol=0)


def _saved_shapes(fn, model):
    """Shapes of the tensors autograd saves for backward, other than the model's own tensors."""
    own = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    shapes = []

    def pack(t):
        if t.data_ptr() not in own:
            shapes.append(tuple(t.shape))
            shapes.append(tuple(t.shape[::-1]))  # a transposed copy counts too
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


@pytest.mark.parametrize("use_dora", [False, True])
def test_backward_does_not_keep_dequantized_weight(tmp_path, use_dora):
    model, _ = dt.load_model(saved_tiny_llama_64(tmp_path), quantize="nf4")
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora, lora_dropout=0.1))
    model.train()
    weight_shapes = {(m.out_features, m.in_features) for _, m in quant.quantized_layers(model)}
    shapes = _saved_shapes(lambda: model(sample_ids()).logits.sum(), model)
    assert shapes, "the hook saw no saved tensors"
    assert not weight_shapes & set(shapes), f"a dequantized weight was saved for backward: {weight_shapes & set(shapes)}"


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("use_dora", [False, True])
def test_gradients_equal_adapter_on_dequantized_weights(tmp_path, quant_type, use_dora):
    quantized, _ = dt.load_model(saved_tiny_llama_64(tmp_path), quantize=quant_type)
    dt.add_adapter(quantized, dt.LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora, lora_dropout=0.2))
    randomize_adapter(quantized)
    plain = copy.deepcopy(quantized)
    for _, layer in dt.adapter_ops.adapter_layers(plain):
        layer.base_layer = layer.base_layer.to_linear()
    assert not quant.quantized_layers(plain)
    ids = sample_ids()
    losses, grads = [], []
    for model in (quantized, plain):
        model.train()
        torch.manual_seed(5)  # the same dropout masks on both
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_invariants_on_quantized_base(tmp_path, quant_type):
    model, _ = dt.load_model(saved_tiny_llama_64(tmp_path / "base"), quantize=quant_type)
    ids = sample_ids()
    with torch.no_grad():
        base = model(ids).logits
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # fresh LoRA (B = 0) changes nothing
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    randomize_adapter(model)
    with torch.no_grad():
        tuned = model(ids).logits
        assert not torch.allclose(tuned, base)
        with dt.disable_adapters(model):
            assert torch.equal(model(ids).logits, base)
    report = dt.merge(model, verbose=False)
    assert report.within_float_rounding
    dt.unmerge(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tuned)
    dt.save_adapter(model, tmp_path / "adapter")
    fresh, _ = dt.load_model(tmp_path / "base", quantize=quant_type)
    dt.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, tuned)


def test_trainable_parameter_count_counts_quantized_weights(tmp_path):
    folder = saved_tiny_llama_64(tmp_path)
    full, _ = dt.load_model(folder)
    quantized, _ = dt.load_model(folder, quantize="nf4")
    dt.add_adapter(full, dt.LoraConfig(r=4, target_modules="all-linear"))
    dt.add_adapter(quantized, dt.LoraConfig(r=4, target_modules="all-linear"))
    assert dt.trainable_parameters(full) == dt.trainable_parameters(quantized)


def test_dtype_cast_moves_compute_dtype_not_stored_bytes():
    _, layer = _layer("nf4")
    packed, absmax = layer.weight.clone(), layer.quant_state.absmax.clone()
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.weight, packed) and torch.equal(layer.quant_state.absmax, absmax)
    assert layer(torch.randn(2, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("quant_type,double_quant,expected", [
    ("nf4", True, 4 + 8 / 64 + (32 * 64 + 32) / (1024 * 1024)),
    ("nf4", False, 4.5),
    ("fp4", True, 4 + 8 / 64 + (32 * 64 + 32) / (1024 * 1024)),
    ("int8", False, 8 + 32 / 1024),
])
def test_bits_per_parameter(quant_type, double_quant, expected):
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False), nn.Linear(1024, 8, bias=False))
    cfg = quant.QuantizeConfig(quant_type, double_quant=double_quant, keep=["1"])
    quant.quantize_model(model, cfg)
    report = quant.memory_report(model)
    assert report.quantized_parameters == 1024 * 1024
    assert report.bits_per_parameter == pytest.approx(expected, rel=1e-9)
    assert isinstance(model[1], nn.Linear)  # kept in full precision as asked


def test_output_head_and_embeddings_stay_full_precision(tmp_path):
    model, _ = dt.load_model(saved_tiny_llama_64(tmp_path), quantize="nf4", keep_full_precision=["mlp.down_proj"])
    names = {n for n, _ in quant.quantized_layers(model)}
    assert "lm_head" not in names and isinstance(model.lm_head, nn.Linear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert not any(n.endswith("down_proj") for n in names)
    assert any(n.endswith("q_proj") for n in names)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_save_and_reload_quantized_base(tmp_path, quant_type):
    model, _ = dt.load_model(saved_tiny_llama_64(tmp_path / "base"), quantize=quant_type)
    quant.save_model(model, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    again, _ = dt.load_model(tmp_path / "saved")
    ids = sample_ids()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="stored as"):
        dt.load_model(tmp_path / "saved", quantize="fp4" if quant_type != "fp4" else "nf4")


def test_bad_quantized_files_name_the_tensor(tmp_path):
    model, _ = dt.load_model(saved_tiny_llama_64(tmp_path / "base"), quantize="nf4")
    quant.save_model(model, tmp_path / "saved")
    path = tmp_path / "saved" / "model.safetensors"
    tensors = load_file(path)
    key = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    broken = dict(tensors)
    broken[key] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    save_file(broken, path)
    with pytest.raises(ValueError, match="q_proj.weight.quant_state.bitsandbytes__nf4: not a JSON"):
        dt.load_model(tmp_path / "saved")
    broken = dict(tensors)
    broken["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:-2]
    save_file(broken, path)
    with pytest.raises(ValueError, match=r"q_proj.weight: .* packed bytes"):
        dt.load_model(tmp_path / "saved")


def test_unknown_quantization_is_refused(tmp_path):
    with pytest.raises(ValueError, match="quantize='nf3' is not supported"):
        dt.load_model(saved_tiny_llama_64(tmp_path), quantize="nf3")


def test_pissa_on_quantized_base_requantizes_residual(tmp_path):
    model, _ = dt.load_model(saved_tiny_llama_64(tmp_path), quantize="nf4")
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.dequantize().clone()
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    wrapped = model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped.base_layer, quant.Linear4bit)
    residual = wrapped.base_layer.dequantize()
    assert not torch.equal(residual, before)
    # base residual + adapter reproduces the original weight up to 4-bit rounding of the residual
    rebuilt = residual + wrapped.delta_weight("default")
    assert (rebuilt - before).abs().max() < (before.abs().max() * 0.2)


def test_readme_qlora_flow(tmp_path):
    """The README's quantized-base example, end to end on a tiny model."""
    model, _ = dt.load_model(saved_tiny_llama_64(tmp_path / "base"), quantize="nf4")
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    opt = dt.train.make_optimizer(model.parameters(), "paged_adamw_8bit", lr=1e-2)
    ids = sample_ids()
    model.train()
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    report = dt.merge(model, verbose=False)
    assert isinstance(report, dt.MergeReport) and report.within_float_rounding
    dt.unmerge(model)
    assert dt.merge(model, requantize=True, verbose=False).requantized
    dt.quant.save_model(model, tmp_path / "saved")
    assert "4bit+double_quant" in str(dt.quant.memory_report(model))


def test_merged_quantized_layer_keeps_original_out_of_the_state_dict(tmp_path):
    model, _ = dt.load_model(saved_tiny_llama_64(tmp_path), quantize="nf4")
    keys_before = set(model.state_dict())
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["q_proj"]))
    dt.merge(model, verbose=False)
    assert not any("_original" in k for k in model.state_dict())
    assert sum(isinstance(m, quant.Linear4bit) for m in model.modules()) == len(
        [k for k in keys_before if k.endswith("proj.weight") and "q_proj" not in k])
    plain = dt.unload(model, merge=False)
    assert set(plain.state_dict()) == keys_before
