"""LoRA's variant fields through DESIGN.md's invariants, and their errors: layer_replication (a
deeper model from shared base layers), aLoRA (the adapter acts from its invocation tokens on) and
QA-LoRA (A reads the input pooled in groups), BD-LoRA (block-diagonal factors), KaSA (a
truncated base and a learned diagonal), VeLoRA (A's input compressed for backward), MonteCLoRA
(a Monte Carlo mixture of perturbed A while training) and Arrow (a per-token router over task
adapters)."""

import copy

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

REPLICATION = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, layer_replication=[[0, 2], [1, 2]])
INVOCATION = [5, 6]
ALORA = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, alora_invocation_tokens=INVOCATION,
             task_type="CAUSAL_LM")


def _invoked_ids(batch=3, length=9):
    """Rows 0 and 1 hold the invocation sequence; the last row does not."""
    ids = sample_ids(batch=batch, length=length)
    ids[ids == INVOCATION[0]] = 3
    ids[0, 2:4] = torch.tensor(INVOCATION)
    ids[1, length - 3:length - 1] = torch.tensor(INVOCATION)
    return ids


def _steps_lower_the_loss(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.02, losses


# ----- layer_replication ---------------------------------------------------------------------
def test_replication_invariants(tmp_path):
    base, ids = tiny_model("llama"), sample_ids()
    plain = eval_logits(base, ids)
    model = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(**REPLICATION))
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    with dt.disable_adapters(model):
        deeper = eval_logits(model, ids)  # the replicated base: layers 0, 1, 1
    assert (deeper - plain).abs().max() > 1e-3
    assert torch.equal(eval_logits(model, ids), deeper)  # a new adapter changes nothing
    # base weights are shared, not copied: the model grows by the adapter only
    assert dt.trainable_parameters(model)[1] == dt.trainable_parameters(base)[1] + dt.trainable_parameters(model)[0]
    assert model.model.layers[1].mlp.up_proj.weight is model.model.layers[2].mlp.up_proj.weight
    base_names = {n for n, _ in model.named_parameters() if "lora_" not in n}
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    randomize_adapter(model)
    tuned = eval_logits(model, ids)
    with dt.disable_adapters(model):
        assert torch.equal(eval_logits(model, ids), deeper)
    dt.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight" in keys  # the new position
    reloaded = dt.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(eval_logits(reloaded, ids), tuned)
    dt.save_adapter(reloaded, tmp_path / "again")
    first, second = (load_file(p / "adapter_model.safetensors") for p in (tmp_path, tmp_path / "again"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert base_names  # (the base parameters keep their names under the copies)

    restored = dt.unload(copy.deepcopy(model), merge=False)
    assert torch.equal(eval_logits(restored, ids), plain) and len(restored.model.layers) == 2
    dt.delete_adapter(model, "default")
    assert torch.equal(eval_logits(model, ids), plain)
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in base.named_parameters()}
    assert model.config.num_hidden_layers == 2 and not hasattr(model, "_deltatune_layer_replication")


def test_replication_trains_routes_and_shares_one_stack():
    base, ids = tiny_model("qwen2"), sample_ids()
    model = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(**REPLICATION), "a")
    dt.add_adapter(model, dt.LoraConfig(**REPLICATION), "b")  # the same map: the same stack
    dt.add_adapter(model, dt.LoraConfig(target_modules=["k_proj"]), "c")  # no map: on the deeper model
    assert len(model.model.layers) == 3
    with pytest.raises(ValueError, match="differs from the replication"):
        dt.add_adapter(model, dt.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 2]]), "d")
    assert "d" not in dt.adapter_ops.get_state(model).configs and len(model.model.layers) == 3
    randomize_adapter(model)
    expected = {}
    for name in ("a", "b"):
        dt.set_adapter(model, name)
        expected[name] = eval_logits(model, ids)
    with dt.disable_adapters(model):
        deeper = eval_logits(model, ids)
    with dt.adapter_per_row(model, ["b", None, "a"]):
        routed = eval_logits(model, ids)
    torch.testing.assert_close(routed[0], expected["b"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routed[1], deeper[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routed[2], expected["a"][2], atol=1e-6, rtol=1e-5)
    for name in ("a", "b"):  # the stack stays while adapter c still sits on it
        dt.delete_adapter(model, name)
    assert len(model.model.layers) == 3
    dt.delete_adapter(model, "c")
    assert len(model.model.layers) == 2 and torch.equal(eval_logits(model, ids), eval_logits(base, ids))

    model = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(**REPLICATION))
    dt.set_adapter(model, "default")
    _steps_lower_the_loss(model, sample_ids(batch=4, length=12))
    generated = model.eval().generate(ids, max_new_tokens=3, do_sample=False)  # the KV cache has 3 layers
    assert generated.shape == (3, ids.shape[1] + 3)


def test_replication_on_an_nf4_base():
    from deltatune.quant import QuantizeConfig, dequantize_model, quantize_model

    quantized = quantize_model(tiny_model("llama"), QuantizeConfig(quant_type="nf4"))
    reference = dequantize_model(copy.deepcopy(quantized))
    for m in (quantized, reference):
        torch.manual_seed(0)
        dt.add_adapter(m, dt.LoraConfig(**REPLICATION))
        randomize_adapter(m)
    ids = sample_ids()
    torch.testing.assert_close(eval_logits(quantized, ids), eval_logits(reference, ids), atol=1e-4, rtol=1e-4)
    before = eval_logits(quantized, ids)
    dt.merge(quantized, verbose=False)
    torch.testing.assert_close(eval_logits(quantized, ids), before, atol=1e-4, rtol=1e-4)
    dt.unmerge(quantized)
    assert torch.equal(eval_logits(quantized, ids), before)


def test_replication_errors():
    for bad in ([[2, 1]], [], [[0, 1, 2]], [[-1, 1]], "0-2", [[0, True]]):
        with pytest.raises(ValueError, match="LoraConfig.layer_replication"):
            dt.LoraConfig(layer_replication=bad)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"goes past the model's 2 layers"):
        dt.add_adapter(model, dt.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 3]]))
    with pytest.raises(ValueError, match="found no layer list"):
        dt.add_adapter(tiny_model("gpt2"), dt.LoraConfig(target_modules=["c_attn"], layer_replication=[[0, 2]]))
    with pytest.raises(ValueError, match="matched no module"):  # all or nothing: the stack goes back
        dt.add_adapter(model, dt.LoraConfig(target_modules=["nothing"], layer_replication=[[0, 2], [0, 2]]))
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    with pytest.raises(NotImplementedError, match="AdaLoraConfig.layer_replication"):
        dt.AdaLoraConfig(layer_replication=[[0, 2]], total_step=10)


def test_replication_with_a_lora_bias_refuses_to_merge_into_shared_biases():
    model = dt.add_adapter(tiny_model("qwen2"), dt.LoraConfig(target_modules=["q_proj"], lora_bias=True,
                                                              layer_replication=[[0, 2], [1, 2]]))
    with pytest.raises(ValueError, match="layer_replication shares"):
        dt.merge(model, verbose=False)


# ----- aLoRA ---------------------------------------------------------------------------------
def test_alora_invariants(tmp_path):
    base, ids = tiny_model("llama"), _invoked_ids()
    plain = eval_logits(base, ids)
    model = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(**ALORA))
    assert torch.equal(eval_logits(model, ids), plain)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    randomize_adapter(model)
    tuned = eval_logits(model, ids)
    assert torch.equal(tuned[2], plain[2])  # no invocation: the base
    assert torch.equal(tuned[0, :2], plain[0, :2]) and (tuned[0, 2:] - plain[0, 2:]).abs().min() > 0
    assert torch.equal(tuned[1, :-3], plain[1, :-3])
    with dt.disable_adapters(model):
        assert torch.equal(eval_logits(model, ids), plain)
    with torch.no_grad():  # only embeddings: no tokens to look for, the base (as PEFT)
        embedded = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    assert torch.equal(embedded, plain)
    with pytest.raises(ValueError, match="cannot be merged.*aLoRA"):
        dt.merge(model, verbose=False)
    with pytest.raises(ValueError, match="cannot be merged.*aLoRA"):
        dt.unload(copy.deepcopy(model), merge=True, verbose=False)
    dt.save_adapter(model, tmp_path)
    reloaded = dt.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(eval_logits(reloaded, ids), tuned)
    restored = dt.unload(copy.deepcopy(model), merge=False)
    assert torch.equal(eval_logits(restored, ids), plain) and not restored._forward_pre_hooks
    dt.delete_adapter(model, "default")
    assert torch.equal(eval_logits(model, ids), plain)
    assert not model._forward_pre_hooks and not hasattr(model, "_deltatune_alora")


def test_alora_routes_per_row_beside_plain_lora_and_trains():
    base, ids = tiny_model("qwen2"), _invoked_ids()
    model = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(**ALORA), "act")
    dt.add_adapter(model, dt.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4), "plain")
    randomize_adapter(model)
    expected = {}
    for name in ("act", "plain"):
        dt.set_adapter(model, name)
        expected[name] = eval_logits(model, ids)
    with dt.adapter_per_row(model, ["plain", "act", "act"]):
        routed = eval_logits(model, ids)
    torch.testing.assert_close(routed[0], expected["plain"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routed[1:], expected["act"][1:], atol=1e-6, rtol=1e-5)
    with dt.adapter_per_row(model, ["act", None, "plain"]):
        generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    dt.set_adapter(model, "act")
    alone = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert generated[0].tolist() == alone[0].tolist()

    model = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(**ALORA))
    _steps_lower_the_loss(model, _invoked_ids(batch=4, length=12))


def test_alora_on_an_nf4_base():
    from deltatune.quant import QuantizeConfig, dequantize_model, quantize_model

    quantized = quantize_model(tiny_model("llama"), QuantizeConfig(quant_type="nf4"))
    reference = dequantize_model(copy.deepcopy(quantized))
    for m in (quantized, reference):
        torch.manual_seed(0)
        dt.add_adapter(m, dt.LoraConfig(**ALORA))
        randomize_adapter(m)
    ids = _invoked_ids()
    torch.testing.assert_close(eval_logits(quantized, ids), eval_logits(reference, ids), atol=1e-4, rtol=1e-4)


def test_alora_errors():
    for bad in ([], [1.5], [-1], "5,6", [True]):
        with pytest.raises(ValueError, match="LoraConfig.alora_invocation_tokens"):
            dt.LoraConfig(alora_invocation_tokens=bad, task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="task_type='CAUSAL_LM'"):
        dt.LoraConfig(alora_invocation_tokens=[5])
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="aLoRA adapts linear layers only"):
        dt.add_adapter(model, dt.LoraConfig(target_modules=["embed_tokens"], alora_invocation_tokens=[5],
                                            task_type="CAUSAL_LM"))
    assert not model._forward_pre_hooks and not hasattr(model, "deltatune_state")
    with pytest.raises(NotImplementedError, match="DyLoraConfig.alora_invocation_tokens"):
        dt.DyLoraConfig(alora_invocation_tokens=[5], task_type="CAUSAL_LM")


# ----- the invariants each variant goes through ------------------------------------------------
def _adapter_invariants(base, model, fields, tmp_path):
    """DESIGN.md's invariants for ``model`` (``base`` with a fresh LoRA adapter of ``fields``): only
    LoRA tensors train; randomised, the adapter changes the output and disabling it gives the base's;
    merge/unmerge, save/load (saving again bit for bit) and unload keep the logits; deleting the
    adapter restores the base's logits and parameters; and a few steps lower the loss."""
    ids = sample_ids()
    plain = eval_logits(base, ids)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    randomize_adapter(model)
    tuned = eval_logits(model, ids)
    assert (tuned - plain).abs().max() > 1e-3
    with dt.disable_adapters(model):
        assert torch.equal(eval_logits(model, ids), plain)  # the base weight itself is never changed
    dt.merge(model, verbose=False)
    torch.testing.assert_close(eval_logits(model, ids), tuned, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)
    assert torch.equal(eval_logits(model, ids), tuned)
    dt.save_adapter(model, tmp_path)
    reloaded = dt.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(eval_logits(reloaded, ids), tuned)
    dt.save_adapter(reloaded, tmp_path / "again")
    first, second = (load_file(p / "adapter_model.safetensors") for p in (tmp_path, tmp_path / "again"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    unloaded = dt.unload(copy.deepcopy(model), merge=True, verbose=False)
    torch.testing.assert_close(eval_logits(unloaded, ids), tuned, atol=1e-5, rtol=1e-5)
    dt.delete_adapter(model, "default")
    assert torch.equal(eval_logits(model, ids), plain)
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in base.named_parameters()}
    _steps_lower_the_loss(dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(**fields)), sample_ids(4, 12))


def _routes_per_row_and_runs_on_an_nf4_base(fields):
    """Two adapters of ``fields`` routed per row give each adapter's rows (a None row: the base's),
    and on an NF4 base the adapter gives the dequantized base's logits, merged too (unmerge exact)."""
    from deltatune.quant import QuantizeConfig, dequantize_model, quantize_model

    base, ids = tiny_model("qwen2"), sample_ids()
    model = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(**fields), "a")
    dt.add_adapter(model, dt.LoraConfig(**fields), "b")
    randomize_adapter(model)
    expected = {}
    for name in ("a", "b"):
        dt.set_adapter(model, name)
        expected[name] = eval_logits(model, ids)
    with dt.adapter_per_row(model, ["b", None, "a"]):
        routed = eval_logits(model, ids)
    torch.testing.assert_close(routed[0], expected["b"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routed[1], eval_logits(base, ids)[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routed[2], expected["a"][2], atol=1e-6, rtol=1e-5)

    quantized = quantize_model(tiny_model("llama"), QuantizeConfig(quant_type="nf4"))
    reference = dequantize_model(copy.deepcopy(quantized))
    for m in (quantized, reference):
        torch.manual_seed(0)
        dt.add_adapter(m, dt.LoraConfig(**fields))
        randomize_adapter(m)
    torch.testing.assert_close(eval_logits(quantized, ids), eval_logits(reference, ids), atol=1e-4, rtol=1e-4)
    before = eval_logits(quantized, ids)
    dt.merge(quantized, verbose=False)
    torch.testing.assert_close(eval_logits(quantized, ids), before, atol=1e-4, rtol=1e-4)
    dt.unmerge(quantized)
    assert torch.equal(eval_logits(quantized, ids), before)


# ----- QA-LoRA -------------------------------------------------------------------------------
QALORA = dict(target_modules="all-linear", r=4, use_qalora=True, qalora_group_size=8)


def test_qalora_invariants(tmp_path):
    base, ids = tiny_model("llama"), sample_ids()
    plain = eval_logits(base, ids)
    model = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(**QALORA))
    assert model.model.layers[0].mlp.down_proj.lora_A["default"].weight.shape == (4, 64 // 8)
    assert torch.equal(eval_logits(model, ids), plain)
    _adapter_invariants(base, model, QALORA, tmp_path)


def test_qalora_routes_per_row_and_runs_on_an_nf4_base():
    _routes_per_row_and_runs_on_an_nf4_base(QALORA)


def test_qalora_errors():
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="LoraConfig.qalora_group_size"):
            dt.LoraConfig(use_qalora=True, qalora_group_size=bad)
    for extra, field in ((dict(use_dora=True), "use_dora"), (dict(lora_bias=True), "lora_bias")):
        with pytest.raises(ValueError, match=f"use_qalora cannot be combined with {field}"):
            dt.LoraConfig(use_qalora=True, **extra)
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        dt.LoraConfig(use_qalora=True, init_lora_weights="pissa")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="32 input features, not a multiple of qalora_group_size=5"):
        dt.add_adapter(model, dt.LoraConfig(target_modules=["q_proj"], use_qalora=True, qalora_group_size=5))
    with pytest.raises(ValueError, match="QA-LoRA adapts linear layers only"):
        dt.add_adapter(model, dt.LoraConfig(target_modules=["embed_tokens"], use_qalora=True, qalora_group_size=4))
    assert not hasattr(model, "deltatune_state")
    with pytest.raises(NotImplementedError, match="AdaLoraConfig.use_qalora"):
        dt.AdaLoraConfig(use_qalora=True, total_step=10)


# ----- BD-LoRA and KaSA ------------------------------------------------------------------------
BDLORA = dict(target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], r=4,
              use_bdlora=dict(target_modules_bd_a=["o_proj", "down_proj"], target_modules_bd_b=["q_proj", "v_proj",
                                                                                                "up_proj"], nblocks=2))
KASA = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, kasa_config=dict(beta=0.01, gamma=0.1))
VELORA = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, velora_config=dict(num_groups=4))
MONTECLORA = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, monteclora_config=dict(num_samples=4))


@pytest.mark.parametrize("fields", [BDLORA, KASA, VELORA, MONTECLORA], ids=["bdlora", "kasa", "velora", "monteclora"])
def test_bdlora_and_kasa_invariants(fields, tmp_path):
    base, ids = tiny_model("llama"), sample_ids()
    plain = eval_logits(base, ids)
    model = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(**fields))
    fresh = eval_logits(model, ids)
    if "kasa_config" in fields:  # KaSA drops the base's r smallest singular components from the start
        assert 1e-6 < (fresh - plain).abs().max() < 1.0
    else:
        assert torch.equal(fresh, plain)
    _adapter_invariants(base, model, fields, tmp_path)


@pytest.mark.parametrize("fields", [BDLORA, KASA, VELORA, MONTECLORA], ids=["bdlora", "kasa", "velora", "monteclora"])
def test_bdlora_and_kasa_route_per_row_and_run_on_an_nf4_base(fields):
    _routes_per_row_and_runs_on_an_nf4_base(fields)


def test_kasa_regularizers_are_the_training_penalty():
    from deltatune.adapter_ops import get_state
    from deltatune.adapters.method import method_for

    model = dt.add_adapter(tiny_model("llama"), dt.LoraConfig(**KASA))
    randomize_adapter(model)
    config = get_state(model).configs["default"]
    penalty = method_for(config).loss_penalty(model, "default", config)
    expected = 0.0
    for layer in (m for m in model.modules() if hasattr(m, "lora_diag")):
        d, A, B = layer.lora_diag["default"], layer.lora_A["default"].weight, layer.lora_B["default"].weight
        eye = torch.eye(4)
        expected += 0.01 * (d ** 2).sum() + 0.1 * ((B.T @ B - eye).norm() + (A @ A.T - eye).norm())
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    assert model.model.layers[0].self_attn.q_proj.lora_diag["default"].grad is not None
    plain = dt.add_adapter(tiny_model("llama"), dt.LoraConfig(target_modules=["q_proj"]))
    config = get_state(plain).configs["default"]
    assert method_for(config).loss_penalty(plain, "default", config) is None


def test_bdlora_and_kasa_errors():
    bad_bdlora = [("x", "must be a dict"), (dict(nblocks=0), "nblocks"), (dict(other=1), "unknown key"),
                  (dict(target_modules_bd_a=["q"], target_modules_bd_b=["q"]), "in both"),
                  (dict(target_modules_bd_a="q_proj"), "list of module-name patterns")]
    for value, message in bad_bdlora:
        with pytest.raises(ValueError, match=message):
            dt.LoraConfig(use_bdlora=value)
    for value, message in (([1], "must be a dict"), (dict(beta=-1), "non-negative"), (dict(delta=1), "must be a dict")):
        with pytest.raises(ValueError, match=message):
            dt.LoraConfig(kasa_config=value)
    with pytest.raises(ValueError, match="kasa_config cannot be combined with use_dora"):
        dt.LoraConfig(kasa_config={}, use_dora=True)
    with pytest.raises(ValueError, match="use_bdlora cannot be combined with use_qalora"):
        dt.LoraConfig(use_bdlora={}, use_qalora=True)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="matches neither"):
        dt.add_adapter(model, dt.LoraConfig(target_modules=["q_proj", "k_proj"],
                                            use_bdlora=dict(target_modules_bd_b=["q_proj"], nblocks=2)))
    with pytest.raises(ValueError, match="nblocks=3 must divide"):
        dt.add_adapter(model, dt.LoraConfig(target_modules=["q_proj"], r=4,
                                            use_bdlora=dict(target_modules_bd_b=["q_proj"], nblocks=3)))
    with pytest.raises(ValueError, match="r=16 must be below min"):
        dt.add_adapter(model, dt.LoraConfig(target_modules=["v_proj"], r=16, kasa_config={}))
    with pytest.raises(ValueError, match="KaSA adapts nn.Linear layers only"):
        dt.add_adapter(tiny_model("gpt2"), dt.LoraConfig(target_modules=["c_attn"], kasa_config={},
                                                         fan_in_fan_out=True))
    assert not hasattr(model, "deltatune_state")
    with pytest.raises(NotImplementedError, match="AdaLoraConfig.kasa_config"):
        dt.AdaLoraConfig(kasa_config={}, total_step=10)


def test_velora_compresses_only_the_gradient_of_a():
    base, ids = tiny_model("llama"), sample_ids()
    plain = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4))
    velora = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(**VELORA))
    randomize_adapter(plain)
    values = dict(plain.named_parameters())
    with torch.no_grad():
        for n, p in velora.named_parameters():
            p.copy_(values[n])
    grads = []
    for model in (plain, velora):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(eval_logits(plain, ids), eval_logits(velora, ids), atol=0, rtol=0)  # forward: LoRA's
    # the last layer's B sees the exact activations; A's gradient is rebuilt from one number per sub-token
    last_b = "model.layers.1.mlp.down_proj.lora_B.default.weight"
    torch.testing.assert_close(grads[0][last_b], grads[1][last_b])
    a = "model.layers.1.mlp.down_proj.lora_A.default.weight"
    assert (grads[0][a] - grads[1][a]).abs().max() > 1e-4
    from deltatune.adapters.low_rank.lora_options.velora import velora_variants
    vectors = [v.embed for v in velora_variants(velora, "default")]
    assert all(torch.isclose(v.norm(), torch.tensor(1.0)) for v in vectors)  # refreshed from the batch
    for bad, message in ((dict(num_groups=0), "num_groups"), (dict(scale=0), "scale"), (dict(init_type="x"), "init_type"),
                         (dict(other=1), "VeloraConfig fields")):
        with pytest.raises(ValueError, match=message):
            dt.LoraConfig(velora_config=bad)
    with pytest.raises(ValueError, match="velora_config cannot be combined with lora_bias"):
        dt.LoraConfig(velora_config={}, lora_bias=True)


def test_monteclora_errors_and_penalty():
    from deltatune.adapter_ops import get_state
    from deltatune.adapters.method import method_for

    for bad, message in ((dict(num_samples=0), "num_samples"), (dict(sample_scaler=-1), "sample_scaler"),
                         (dict(use_entropy=1), "use_entropy"), (dict(other=1), "MontecloraConfig fields")):
        with pytest.raises(ValueError, match=message):
            dt.LoraConfig(monteclora_config=bad)
    with pytest.raises(ValueError, match="monteclora_config cannot be combined with use_dora"):
        dt.LoraConfig(monteclora_config={}, use_dora=True)
    model = dt.add_adapter(tiny_model("llama"), dt.LoraConfig(**MONTECLORA))
    model.train()
    model(input_ids=sample_ids())
    config = get_state(model).configs["default"]
    penalty = method_for(config).loss_penalty(model, "default", config)
    assert penalty.requires_grad and torch.isfinite(penalty)


# ----- Arrow ---------------------------------------------------------------------------------
def _arrow_model(base, **settings):
    model = copy.deepcopy(base)
    fields = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, init_lora_weights=False)
    for i in range(3):
        torch.manual_seed(i)
        dt.add_adapter(model, dt.LoraConfig(**fields), f"task_{i}")
    router = dict(task_adapter_names=["task_0", "task_1", "task_2"], top_k=2, rng_seed=0, **settings)
    dt.add_adapter(model, dt.LoraConfig(**fields, arrow_config=router), "router")
    dt.set_adapter(model, "router")
    return model


def test_arrow_router_invariants_routing_and_nf4():
    from deltatune.quant import QuantizeConfig, dequantize_model, quantize_model

    base, ids = tiny_model("llama"), sample_ids()
    plain = eval_logits(base, ids)
    model = _arrow_model(base)
    routed = eval_logits(model, ids)
    assert (routed - plain).abs().max() > 1e-3
    for name in ("task_0", "task_1", "task_2"):  # a mixture per token: none of the tasks alone
        dt.set_adapter(model, name)
        assert (eval_logits(model, ids) - routed).abs().max() > 1e-4
    dt.set_adapter(model, "router")
    with dt.disable_adapters(model):
        assert torch.equal(eval_logits(model, ids), plain)
    with dt.adapter_per_row(model, ["router", None, "router"]):
        rows = eval_logits(model, ids)
    torch.testing.assert_close(rows[0], routed[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rows[1], plain[1], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot be merged.*Arrow router"):
        dt.merge(model, verbose=False)
    dt.delete_adapter(model, "router")
    dt.set_adapter(model, "task_0")
    assert (eval_logits(model, ids) - plain).abs().max() > 1e-3  # the tasks stay
    for name in ("task_0", "task_1", "task_2"):
        dt.delete_adapter(model, name)
    assert torch.equal(eval_logits(model, ids), plain)

    quantized = quantize_model(tiny_model("llama"), QuantizeConfig(quant_type="nf4"))
    reference = dequantize_model(copy.deepcopy(quantized))
    torch.testing.assert_close(eval_logits(_arrow_model(quantized), ids), eval_logits(_arrow_model(reference), ids),
                               atol=1e-4, rtol=1e-4)


def test_arrow_gks_subtracts_the_general_mean_once():
    base, ids = tiny_model("llama"), sample_ids()
    model = copy.deepcopy(base)
    fields = dict(target_modules=["q_proj"], r=4, init_lora_weights=False)
    for name in ("task_0", "task_1", "gks_0", "gks_1"):
        dt.add_adapter(model, dt.LoraConfig(**fields), name)
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.lora_A["task_0"].weight.detach().clone()
    mean = (layer.lora_A["gks_0"].weight + layer.lora_A["gks_1"].weight).detach() / 2
    dt.add_adapter(model, dt.LoraConfig(**fields, arrow_config=dict(
        task_adapter_names=["task_0", "task_1"], gks_adapter_names=["gks_0", "gks_1"], use_gks=True)), "router")
    dt.set_adapter(model, "router")
    eval_logits(model, ids)
    eval_logits(model, ids)
    torch.testing.assert_close(layer.lora_A["task_0"].weight, before - mean)


def test_arrow_errors():
    for bad, message in ((dict(), "task_adapter_names"), (dict(task_adapter_names=["a"], top_k=0), "top_k"),
                         (dict(task_adapter_names=["a"], router_temperature=0), "router_temperature"),
                         (dict(task_adapter_names=["a"], use_gks=True), "gks_adapter_names"),
                         (dict(task_adapter_names="a"), "list of adapter names"), (dict(x=1), "ArrowConfig fields")):
        with pytest.raises(ValueError, match=message):
            dt.LoraConfig(arrow_config=bad)
    model = dt.add_adapter(tiny_model("llama"), dt.LoraConfig(target_modules=["q_proj"]), "task_0")
    with pytest.raises(ValueError, match="holds no LoRA adapter 'task_1'"):
        dt.add_adapter(model, dt.LoraConfig(target_modules=["q_proj"], arrow_config=dict(
            task_adapter_names=["task_0", "task_1"])), "router")
    assert sorted(dt.adapter_ops.get_state(model).configs) == ["task_0"]
