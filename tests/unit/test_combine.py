"""add_weighted_adapter: cat is exact, svd at full rank is exact, the pruning methods do what they say."""

import copy

import pytest
import torch

import deltatune as dt
from deltatune.adapters import LoraLayer
from deltatune.combine import magnitude_prune, sign_consensus_merge
from tiny_models import randomize_adapter, sample_ids, tiny_model


@pytest.fixture
def model():
    m = tiny_model("llama")
    dt.add_adapter(m, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                    init_lora_weights=False), name="a")
    dt.add_adapter(m, dt.LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "o_proj"],
                                    init_lora_weights=False), name="b")
    randomize_adapter(m)
    return m


def _layers(model):
    return [(k, m) for k, m in model.named_modules() if isinstance(m, LoraLayer)]


def _expected(layer, weights):
    total = 0
    for name, w in weights.items():
        if name in layer.adapter_names:
            total = total + w * layer.delta_weight(name)
    return total


@pytest.mark.parametrize("combination,kwargs", [("cat", {}), ("svd", {"svd_rank": 6}),
                                                ("dare_linear", {"density": 1.0, "svd_rank": 6}),
                                                ("magnitude_prune", {"density": 1.0, "svd_rank": 6})])
def test_exact_combinations_equal_weighted_sum(model, combination, kwargs):
    dt.add_weighted_adapter(model, ["a", "b"], [0.7, -0.3], "ab", combination=combination, **kwargs)
    for _, layer in _layers(model):
        expected = _expected(layer, {"a": 0.7, "b": -0.3})
        torch.testing.assert_close(layer.delta_weight("ab"), expected, atol=1e-5, rtol=1e-4)


def test_cat_adapter_outputs_equal_both_adapters_weighted(model, tmp_path):
    dt.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab", combination="cat")
    dt.set_adapter(model, ["a", "b"])
    with torch.no_grad():
        both = model(sample_ids()).logits
    dt.set_adapter(model, "ab")
    with torch.no_grad():
        combined = model(sample_ids()).logits
    torch.testing.assert_close(combined, both, atol=1e-5, rtol=1e-5)
    dt.save_adapter(model, tmp_path, name="ab")  # the new adapter is an ordinary PEFT-format adapter
    fresh = tiny_model("llama")
    dt.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(sample_ids()).logits, combined, atol=1e-6, rtol=1e-6)


def test_linear_with_one_adapter_reproduces_it(model):
    dt.add_weighted_adapter(model, ["a"], [1.0], "a2", combination="linear")
    for _, layer in _layers(model):
        if "a" in layer.adapter_names:
            torch.testing.assert_close(layer.delta_weight("a2"), layer.delta_weight("a"), atol=1e-6, rtol=1e-5)


def test_linear_refuses_unequal_ranks(model):
    with pytest.raises(ValueError, match="equal ranks"):
        dt.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "ab", combination="linear")


@pytest.mark.parametrize("combination", ["ties", "dare_ties", "dare_linear", "magnitude_prune", "svd"])
def test_pruning_methods_build_a_usable_adapter(model, combination):
    dt.add_weighted_adapter(model, ["a", "b"], [0.6, 0.4], "mix", combination=combination, density=0.5, svd_rank=3)
    dt.set_adapter(model, "mix")
    with torch.no_grad():
        out = model(sample_ids()).logits
    assert torch.isfinite(out).all()
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.r["mix"] == 3


def test_task_arithmetic_primitives():
    t = torch.tensor([[0.1, -4.0], [3.0, -0.2]])
    assert torch.equal(magnitude_prune(t, 0.5), torch.tensor([[0.0, -4.0], [3.0, 0.0]]))
    merged = sign_consensus_merge([torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, -1.5])])
    # signs elected: +, -, -; only agreeing entries are averaged
    assert torch.equal(merged, torch.tensor([2.0, -2.0, -1.5]))


def test_dora_and_unknown_combinations_are_refused(model):
    dt.add_adapter(model, dt.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), name="d")
    with pytest.raises(ValueError, match="not DoRA"):
        dt.add_weighted_adapter(model, ["a", "d"], [0.5, 0.5], "x", combination="cat")
    with pytest.raises(ValueError, match="unknown combination"):
        dt.add_weighted_adapter(model, ["a"], [1.0], "x", combination="average")
