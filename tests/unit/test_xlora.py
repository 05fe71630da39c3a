"""X-LoRA's invariants on tiny models: what an untrained classifier promises (one expert under a
softmax is that LoRA adapter; a zero global weight is the base), only the classifier trains (and
the experts with use_trainable_adapters), disabling gives the base bit for bit, merging is refused,
files round-trip bit-exactly, deleting restores the base, routing per row, a few steps lower the
loss, and bad input fails with a message that names the field or file."""

import copy
import json

import pytest
import torch

import deltatune as dt
from tiny_models import eval_logits, sample_ids, tiny_model

EXPERTS = {"0": dict(target_modules=["q_proj", "v_proj"], r=4),
           "1": dict(target_modules=["v_proj", "down_proj", "embed_tokens"], r=2, lora_alpha=4)}


def _experts(base, folder, experts=EXPERTS, **extra):
    """Random LoRA adapters saved by deltatune; returns name -> folder."""
    paths = {}
    for i, (name, fields) in enumerate(experts.items()):
        torch.manual_seed(20 + i)
        model = copy.deepcopy(base)
        dt.add_adapter(model, dt.LoraConfig(init_lora_weights=False, **fields, **extra))
        paths[name] = str(dt.save_adapter(model, folder / f"lora{name}"))
    return paths


def _xlora(base, paths, **fields):
    model = copy.deepcopy(base)
    torch.manual_seed(5)
    dt.add_adapter(model, dt.XLoraConfig(adapters=paths, **fields))
    return model


@pytest.fixture
def base():
    return tiny_model("llama")


def test_one_expert_under_softmax_is_that_lora_adapter(base, tmp_path):
    paths = _experts(base, tmp_path)
    model = _xlora(base, {"0": paths["0"]})
    lora = copy.deepcopy(base)
    dt.load_adapter(lora, paths["0"])
    ids = sample_ids()
    torch.testing.assert_close(eval_logits(model, ids), eval_logits(lora, ids), atol=1e-6, rtol=0)


def test_zero_global_weight_is_the_base(base, tmp_path):
    model = _xlora(base, _experts(base, tmp_path), global_scaling_weight=0.0)
    ids = sample_ids()
    torch.testing.assert_close(eval_logits(model, ids), eval_logits(base, ids), atol=1e-6, rtol=0)


def test_only_the_classifier_trains_unless_the_experts_are_trainable(base, tmp_path):
    paths = _experts(base, tmp_path)
    model = _xlora(base, paths, xlora_depth=2, xlora_size=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("deltatune_xlora.classifiers.default.") for n in trainable)
    assert dt.trainable_parameters(model)[0] == (32 * 8 + 8) + (8 * 2 + 2)
    model = _xlora(base, paths, use_trainable_adapters=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    experts = {n for n in trainable if ".lora_" in n}
    assert experts and trainable - experts == {f"deltatune_xlora.classifiers.default.layers.0.{k}"
                                               for k in ("weight", "bias")}
    assert not any("base_layer" in n for n in trainable)


def test_disable_is_the_base_bit_for_bit_and_merge_is_refused(base, tmp_path):
    model = _xlora(base, _experts(base, tmp_path))
    ids = sample_ids()
    assert (eval_logits(model, ids) - eval_logits(base, ids)).abs().max() > 1e-3
    with dt.disable_adapters(model):
        assert torch.equal(eval_logits(model, ids), eval_logits(base, ids))
    with pytest.raises(ValueError, match="cannot be merged"):
        dt.merge(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        dt.unload(model, merge=True)


def test_save_load_round_trip_is_bit_exact_and_delete_restores(base, tmp_path):
    paths = _experts(base, tmp_path)
    model = _xlora(base, paths, layerwise_scalings=True, xlora_depth=2, xlora_size=8, top_k_lora=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    ids = sample_ids()
    tuned = eval_logits(model, ids)
    folder = dt.save_adapter(model, tmp_path / "xlora")
    assert sorted(p.name for p in folder.iterdir()) == ["0", "1", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "XLORA" and config["adapters"] == paths and config["hidden_size"] == 32
    for path in paths.values():  # the experts load from the saved sub-folders, not the original paths
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (tmp_path / path.split("/")[-1] / f).unlink()
    fresh = copy.deepcopy(base)
    dt.load_adapter(fresh, folder)
    assert torch.equal(eval_logits(fresh, ids), tuned)
    dt.delete_adapter(fresh, "default")
    assert torch.equal(eval_logits(fresh, ids), eval_logits(base, ids))
    assert not hasattr(fresh, "deltatune_xlora") and not fresh._forward_pre_hooks
    assert [type(m) for m in fresh.modules()] == [type(m) for m in base.modules()]


def test_routing_per_row_matches_whole_batches(base, tmp_path):
    model = _xlora(base, _experts(base, tmp_path))
    torch.manual_seed(0)
    dt.add_adapter(model, dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), name="plain")
    ids = sample_ids()
    xlora = eval_logits(model, ids)
    dt.set_adapter(model, "plain")
    plain = eval_logits(model, ids)
    with dt.adapter_per_row(model, ["default", None, "plain"]):
        routed = eval_logits(model, ids)
    torch.testing.assert_close(routed[0], xlora[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(routed[1], eval_logits(base, ids)[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(routed[2], plain[2], atol=1e-6, rtol=0)


def test_a_few_steps_lower_the_loss(base, tmp_path):
    model = _xlora(base, _experts(base, tmp_path), xlora_depth=2, xlora_size=16, xlora_dropout_p=0.0)
    ids = sample_ids(batch=4, length=8)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_generate_needs_use_cache_false(base, tmp_path):
    model = _xlora(base, _experts(base, tmp_path))
    ids = sample_ids(batch=1, length=4)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False)
    assert out.shape == (1, 7)
    with pytest.raises(RuntimeError, match="use_cache=False"):
        model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True)


def test_evaluation_generates_with_full_passes(base, tmp_path):
    """deltatune eval's generation asks the model whether it can use a key/value cache: X-LoRA's
    cannot, so its answers come from full passes (what use_cache=False gives); disabled, it can."""
    from deltatune.data.tokenize import Example
    from deltatune.evaluate.examples import EvalExample
    from deltatune.evaluate.generation import cache_usable, generate

    model = _xlora(base, _experts(base, tmp_path))
    assert not cache_usable(model)
    ids = sample_ids(batch=2, length=4)
    examples = [EvalExample(i, "", row.tolist(), "", Example(row.tolist(), row.tolist())) for i, row in enumerate(ids)]

    class Tokens:  # decodes ids as text, so the answers compare exactly
        pad_token_id, eos_token_id = 0, 2

        @staticmethod
        def decode(row, skip_special_tokens=True):
            return " ".join(str(int(t)) for t in row)

    answers = generate(model, Tokens, examples, batch_size=2, max_new_tokens=3, seq2seq=False)
    expected = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False, pad_token_id=0, eos_token_id=2)
    assert answers == [Tokens.decode(row[4:]) for row in expected]
    with dt.disable_adapters(model):
        assert cache_usable(model)


def test_bad_input_is_named(base, tmp_path):
    with pytest.raises(ValueError, match="XLoraConfig.adapters"):
        dt.XLoraConfig()
    with pytest.raises(ValueError, match="top_k_lora"):
        dt.XLoraConfig(adapters={"0": "a"}, top_k_lora=2)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dt.add_adapter(copy.deepcopy(base), dt.XLoraConfig(adapters={"0": str(tmp_path / "nowhere")}))
    paths = _experts(base, tmp_path)
    with pytest.raises(ValueError, match="hidden_size=64"):
        dt.add_adapter(copy.deepcopy(base), dt.XLoraConfig(adapters=paths, hidden_size=64))
    dora = _experts(base, tmp_path / "dora", {"0": dict(target_modules=["q_proj"], r=2)}, use_dora=True)
    model = copy.deepcopy(base)
    with pytest.raises(NotImplementedError, match="use_dora"):
        dt.add_adapter(model, dt.XLoraConfig(adapters=dora))
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]  # all or nothing


def test_works_on_an_nf4_base(base, tmp_path):
    from deltatune.quant import QuantizeConfig, dequantize_model, quantize_model

    paths = _experts(base, tmp_path)
    quantized = quantize_model(copy.deepcopy(base), QuantizeConfig(quant_type="nf4"))
    reference = dequantize_model(copy.deepcopy(quantized))  # the same weights, in float32
    models = [_xlora(m, paths) for m in (quantized, reference)]  # the same classifier draw on both
    ids = sample_ids()
    torch.testing.assert_close(eval_logits(models[0], ids), eval_logits(models[1], ids), atol=1e-4, rtol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients(base, tmp_path):
    paths = _experts(base, tmp_path)
    ids = sample_ids()
    grads = []
    for checkpointing in (False, True):
        model = _xlora(base, paths, xlora_depth=2, xlora_size=8, xlora_dropout_p=0.0, layerwise_scalings=True)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
