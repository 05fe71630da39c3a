"""The invariants of DESIGN.md for LoRA, rsLoRA and DoRA on Linear, Conv1D and Embedding targets."""

import copy

import pytest
import torch

import deltatune as dt
from deltatune.adapters import AdapterLayer, LoraLayer
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

METHODS = {
    "lora": dict(),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
}
TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
    "gpt2": ["c_attn", "c_fc", "wte"],
}
CASES = [(m, a) for m in METHODS for a in TARGETS]


def _adapted(method, arch, **extra):
    base = tiny_model(arch)
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], **METHODS[method], **extra))
    return base, model


def _logits(model, ids=None):
    with torch.no_grad():
        return model(sample_ids() if ids is None else ids).logits


@pytest.mark.parametrize("method,arch", CASES)
def test_fresh_adapter_leaves_outputs_unchanged(method, arch):
    base, model = _adapted(method, arch)
    if method == "dora":  # m = ||W|| at init, so the scale is 1 up to rounding
        torch.testing.assert_close(_logits(model), _logits(base), atol=1e-5, rtol=0)
    else:
        assert torch.equal(_logits(model), _logits(base))


@pytest.mark.parametrize("method,arch", CASES)
def test_only_adapter_parameters_require_grad(method, arch):
    _, model = _adapted(method, arch)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    if method == "dora":
        assert any("lora_magnitude_vector" in n for n in trainable)
    loss = model(sample_ids()).logits.square().mean()
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("method,arch", CASES)
def test_disable_gives_base_outputs_bit_for_bit(method, arch):
    base, model = _adapted(method, arch, init_lora_weights=False)
    randomize_adapter(model)
    assert not torch.allclose(_logits(model), _logits(base), atol=1e-3)
    with dt.disable_adapters(model):
        assert torch.equal(_logits(model), _logits(base))
    dt.set_adapter(model, None)
    assert torch.equal(_logits(model), _logits(base))


@pytest.mark.parametrize("method,arch", CASES)
def test_merge_matches_unmerged_and_unmerge_restores_exactly(method, arch):
    base, model = _adapted(method, arch, init_lora_weights=False)
    randomize_adapter(model)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    expected = _logits(model)
    dt.merge(model)
    merged_layers = [m for m in model.modules() if isinstance(m, AdapterLayer) and m.merged_adapters]
    assert merged_layers
    torch.testing.assert_close(_logits(model), expected, atol=2e-5, rtol=1e-5)
    with dt.disable_adapters(model):  # disabling a merged model still gives the base exactly
        assert torch.equal(_logits(model), _logits(base))
    torch.testing.assert_close(_logits(model), expected, atol=2e-5, rtol=1e-5)
    dt.unmerge(model)
    unloaded = dt.unload(copy.deepcopy(model), merge=False)
    for key, value in unloaded.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(_logits(model), expected)


@pytest.mark.parametrize("method,arch", CASES)
def test_save_load_round_trip_is_bit_exact(method, arch, tmp_path):
    base, model = _adapted(method, arch, init_lora_weights=False)
    randomize_adapter(model)
    dt.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    other = copy.deepcopy(base)
    dt.load_adapter(other, tmp_path / "a")
    mine = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    theirs = dict(other.named_parameters())
    assert mine and all(torch.equal(p, theirs[n]) for n, p in mine.items())
    assert torch.equal(_logits(model), _logits(other))
    assert not any(p.requires_grad for p in other.parameters())  # trainable=False by default


def test_several_adapters_set_delete():
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    cfg = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    dt.add_adapter(model, cfg, name="a")
    dt.add_adapter(model, dt.LoraConfig(r=2, target_modules=["o_proj", "v_proj"], init_lora_weights=False), name="b")
    assert dt.active_adapters(model) == ["a"]
    only_a = _logits(model)
    dt.set_adapter(model, "b")
    only_b = _logits(model)
    dt.set_adapter(model, ["a", "b"])
    both = _logits(model)
    base_out = _logits(base)
    assert not torch.allclose(only_a, only_b)
    # Each LoRA adds its own term; on the first layer's output both contribute.
    assert not torch.allclose(both, only_a) and not torch.allclose(both, only_b)
    # ... and on a layer both adapt, the output is exactly base + a's term + b's term (a mix that
    # only differs from each single adapter would pass the line above).
    v_proj = model.model.layers[0].self_attn.v_proj
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        terms = v_proj.base_layer(x) + x @ v_proj.delta_weight("a").T + x @ v_proj.delta_weight("b").T
        torch.testing.assert_close(v_proj(x), terms, atol=1e-6, rtol=1e-5)
    dt.delete_adapter(model, "a")
    assert dt.active_adapters(model) == ["b"]
    assert torch.equal(_logits(model), only_b)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, torch.nn.Linear)  # no adapter left there: the base module is back
    dt.delete_adapter(model, "b")
    assert torch.equal(_logits(model), base_out)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    with pytest.raises(ValueError, match="no deltatune adapters"):
        dt.set_adapter(model, "a")


def test_second_adapter_layer_is_not_wrapped_twice():
    model = tiny_model("llama")
    dt.add_adapter(model, dt.LoraConfig(target_modules="all-linear"), name="a")
    dt.add_adapter(model, dt.LoraConfig(target_modules="all-linear"), name="b")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLayer) and isinstance(layer.base_layer, torch.nn.Linear)
    assert layer.adapter_names == ["a", "b"]
    assert not isinstance(model.lm_head, LoraLayer)  # all-linear leaves out the output head


@pytest.mark.parametrize("init", ["gaussian", "pissa", "pissa_niter_4", "olora"])
def test_init_variants_keep_outputs(init):
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights=init))
    torch.testing.assert_close(_logits(model), _logits(base), atol=1e-4, rtol=1e-4)
    layer = model.model.layers[0].self_attn.q_proj
    A, B = layer.factors("default")
    if init == "gaussian":
        assert torch.count_nonzero(B) == 0
    else:  # principal part moved into the adapter, residual left in the base
        assert torch.count_nonzero(B) > 0
        assert not torch.equal(layer.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_trainable_parameter_count_and_summary(capsys):
    model = tiny_model("llama")
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, total = dt.trainable_parameters(model)
    # q_proj: 32->32, v_proj: 32->16, two layers: r*(in+out) each
    assert trainable == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert total == sum(p.numel() for p in model.parameters())
    line = dt.print_trainable_parameters(model)
    assert line in capsys.readouterr().out and f"{trainable:,d}" in line


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_options_train_and_save_biases(bias, tmp_path):
    model = tiny_model("gpt2")
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["c_attn"], bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn.c_attn.base_layer.bias" in trainable
    assert ("transformer.h.0.mlp.c_fc.bias" in trainable) == (bias == "all")
    dt.save_adapter(model, tmp_path)
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in keys
    assert ("base_model.model.transformer.h.0.mlp.c_fc.bias" in keys) == (bias == "all")


def test_lora_bias_merges():
    base = tiny_model("qwen2")
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False))
    randomize_adapter(model)
    expected = _logits(model)
    dt.merge(model)
    torch.testing.assert_close(_logits(model), expected, atol=2e-5, rtol=1e-5)
    q_proj = model.model.layers[0].self_attn.q_proj.base_layer
    assert not torch.equal(q_proj.bias, base.model.layers[0].self_attn.q_proj.bias)  # lora_bias went into the bias
    # unmerge must put the bias back too (the invariant test above has no merged bias)
    _assert_unmerges_to(model, base, expected)


def _assert_unmerges_to(model, base, expected) -> None:
    """After ``dt.unmerge`` every base tensor is ``base``'s exactly and the logits are ``expected``."""
    dt.unmerge(model)
    plain = dt.unload(copy.deepcopy(model), merge=False).state_dict()
    assert all(torch.equal(v, plain[k]) for k, v in base.state_dict().items())
    assert torch.equal(_logits(model), expected)


def test_merging_one_adapter_at_a_time_unmerges_to_the_base():
    """Two merge calls, then one unmerge: the base weights before the first merge come back exactly."""
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    for name in ("a", "b"):
        dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                       name=name)
    randomize_adapter(model)
    dt.set_adapter(model, ["a", "b"])
    expected = _logits(model)
    dt.merge(model, ["a"], verbose=False)
    dt.merge(model, ["b"], verbose=False)
    torch.testing.assert_close(_logits(model), expected, atol=2e-5, rtol=1e-5)
    _assert_unmerges_to(model, base, expected)


def test_dropout_is_used_in_training_only():
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5, init_lora_weights=False,
                                        use_dora=True))
    eval_out = _logits(model)
    assert torch.equal(_logits(model), eval_out)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        train_out = model(sample_ids()).logits
    assert not torch.allclose(train_out, eval_out)


@pytest.mark.parametrize("make", [lambda: dt.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], fan_in_fan_out=True),
                                  lambda: dt.VeraConfig(r=8, target_modules=["q_proj", "down_proj"], fan_in_fan_out=True)])
def test_fan_in_fan_out_on_nn_linear_is_ignored_with_a_warning(make):
    """An nn.Linear stores (out, in) whatever the flag says; PEFT resets the flag per layer too."""
    base = tiny_model("llama")
    flagged, plain = copy.deepcopy(base), copy.deepcopy(base)
    with pytest.warns(UserWarning, match="fan_in_fan_out=True, but the targeted layer is an nn.Linear"):
        torch.manual_seed(0)
        dt.add_adapter(flagged, make())
    config = make()
    config.fan_in_fan_out = False
    torch.manual_seed(0)
    dt.add_adapter(plain, config)
    randomize_adapter(flagged)
    randomize_adapter(plain)
    ids = sample_ids()
    assert torch.equal(eval_logits(flagged, ids), eval_logits(plain, ids))
