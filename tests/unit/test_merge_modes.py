"""Merged models in every merge mode survive the operations that unmerge for a while, bit for bit;
DoRA merges keep outputs; DoRA with ``lora_bias`` is refused, as PEFT refuses it.

Merge modes: a float32 base; NF4, FP4 and int8 bases merged into full precision or re-quantized;
each with LoRA and with DoRA.
"""

import contextlib
import copy
import json

import pytest
import torch

import deltatune as dt
from deltatune import quant
from deltatune.adapters import AdapterLayer
from deltatune.adapter_ops import adapter_layers
from tiny_models import randomize_adapter, sample_ids, saved_tiny_llama_64, tiny_model

# (quantize, requantize) per merge mode
MODES = {
    "float32": (None, False),
    "nf4": ("nf4", False),
    "nf4-requantized": ("nf4", True),
    "fp4": ("fp4", False),
    "fp4-requantized": ("fp4", True),
    "int8": ("int8", False),
    "int8-requantized": ("int8", True),
}
# The output head stays in full precision on a quantized base, so every model mixes both kinds.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return saved_tiny_llama_64(tmp_path_factory.mktemp("base"))


def _load(folder, quantize):
    model, _ = dt.load_model(folder, quantize=quantize, tokenizer=False)
    return model


_BASE_LOGITS: dict = {}


def _base_logits(folder, quantize):
    """Logits of the base model as loaded, without adapters (computed once per base)."""
    if (folder, quantize) not in _BASE_LOGITS:
        _BASE_LOGITS[folder, quantize] = _logits(_load(folder, quantize))
    return _BASE_LOGITS[folder, quantize]


def _adapted(folder, quantize, use_dora, names=("default",)):
    model = _load(folder, quantize)
    for i, name in enumerate(names):
        dt.add_adapter(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=use_dora,
                                            init_lora_weights=False), name=name)
        randomize_adapter(model, seed=2 + i)
        for p in model.parameters():  # the next adapter's randomize must not touch this one
            p.requires_grad_(False)
    return model


def _logits(model, ids=None):
    with torch.no_grad():
        return model(sample_ids() if ids is None else ids).logits


def _snapshot(model):
    """Everything a merge decides: every tensor (values and dtype), each layer's base class and flags."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layers = {key: (type(layer.base_layer), list(layer.merged_adapters), layer.merge_requantized)
              for key, layer in adapter_layers(model) if isinstance(layer, AdapterLayer)}
    return tensors, layers


def _assert_same(before, after):
    tensors, layers = before
    now_tensors, now_layers = after
    assert now_layers == layers
    assert now_tensors.keys() == tensors.keys()
    for key, value in tensors.items():
        assert now_tensors[key].dtype == value.dtype, key
        assert torch.equal(now_tensors[key], value), key


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("mode", list(MODES))
def test_disable_adapters_leaves_every_merge_mode_exactly_as_it_was(folder, mode, use_dora):
    quantize, requantize = MODES[mode]
    base_logits = _base_logits(folder, quantize)
    model = _adapted(folder, quantize, use_dora)
    dt.merge(model, requantize=requantize, verbose=False)
    if requantize:
        assert all(isinstance(layer.base_layer, quant.QuantLinear) for key, layer in adapter_layers(model)
                   if not key.endswith("lm_head"))
    before, merged = _snapshot(model), _logits(model)
    assert not torch.allclose(merged, base_logits, atol=1e-3)  # the merge really changed the model

    with dt.disable_adapters(model):
        assert torch.equal(_logits(model), base_logits)
    _assert_same(before, _snapshot(model))
    assert torch.equal(_logits(model), merged)

    with dt.disable_adapters(model):  # and again: the second round trip starts from the restored state
        pass
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("mode", ["float32", "nf4-requantized", "int8-requantized"])
def test_merges_made_in_two_steps_survive_disable(folder, mode):
    """Re-merging all adapters at once would not give these bytes back (rounding between steps)."""
    quantize, requantize = MODES[mode]
    model = _adapted(folder, quantize, use_dora=True, names=("a", "b"))
    dt.merge(model, ["a"], requantize=requantize, verbose=False)
    dt.merge(model, ["b"], requantize=requantize, verbose=False)
    before, merged = _snapshot(model), _logits(model)
    with dt.disable_adapters(model):
        pass
    _assert_same(before, _snapshot(model))
    assert torch.equal(_logits(model), merged)


def test_tied_head_stays_untied_with_the_same_parameter():
    base = tiny_model("gpt2")  # lm_head is tied to wte
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["c_attn", "lm_head"], init_lora_weights=False))
    randomize_adapter(model)
    dt.merge(model, verbose=False)
    head = model.lm_head.base_layer.weight
    assert head is not model.transformer.wte.weight
    before, merged = _snapshot(model), _logits(model)
    with dt.disable_adapters(model):
        assert torch.equal(_logits(model), _logits(base))
    _assert_same(before, _snapshot(model))
    assert model.lm_head.base_layer.weight is head  # an optimizer holding it still sees the model's tensor
    assert torch.equal(model.transformer.wte.weight, base.transformer.wte.weight)
    assert torch.equal(_logits(model), merged)
    dt.unmerge(model)
    assert model.lm_head.base_layer.weight is model.transformer.wte.weight  # tied again


def test_nested_disable_keeps_the_outer_block_disabled(folder):
    base_logits = _base_logits(folder, "nf4")
    model = _adapted(folder, "nf4", use_dora=False)
    dt.merge(model, requantize=True, verbose=False)
    before = _snapshot(model)
    with dt.disable_adapters(model):
        with dt.disable_adapters(model):
            pass
        assert torch.equal(_logits(model), base_logits)
    _assert_same(before, _snapshot(model))


def test_inside_disable_merge_is_refused_and_unmerge_sticks(folder):
    model = _adapted(folder, "nf4", use_dora=False)
    tuned = _logits(model)
    dt.merge(model, requantize=True, verbose=False)
    with dt.disable_adapters(model):
        with pytest.raises(RuntimeError, match="disable_adapters"):
            dt.merge(model, verbose=False)
        dt.unmerge(model)
    assert not any(layer.merged_adapters for _, layer in adapter_layers(model))
    assert torch.equal(_logits(model), tuned)  # unmerged: the adapters run on the original bytes


def test_deleting_a_merged_adapter_is_refused_before_any_work(folder):
    model = _load(folder, "nf4")
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                        init_lora_weights=False))
    dt.merge(model, verbose=False)
    before = _snapshot(model)
    for context in (contextlib.nullcontext(), dt.disable_adapters(model)):
        with context:
            with pytest.raises(RuntimeError, match="merged"):
                dt.delete_adapter(model, "default")
    _assert_same(before, _snapshot(model))
    assert "default" in model.model.embed_tokens.modules_to_save  # nothing was deleted half way
    dt.unmerge(model)
    dt.delete_adapter(model, "default")
    assert not any(True for _ in adapter_layers(model))


# ----- DoRA and biases ----------------------------------------------------------------------------
def test_dora_with_lora_bias_is_refused_as_peft_refuses_it(tmp_path):
    base = tiny_model("qwen2")
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"lora_bias=True.*use_dora=True"):
        dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, lora_bias=True))
    assert not hasattr(model, "deltatune_state")
    assert model.state_dict().keys() == base.state_dict().keys()
    # A file that asks for both is refused by the same check (not by its missing magnitudes), adding nothing.
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    dt.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    other = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"lora_bias=True.*use_dora=True"):
        dt.load_adapter(other, tmp_path)
    assert not hasattr(other, "deltatune_state")


def test_peft_refuses_dora_with_lora_bias():
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="lora_bias=True is not supported for DoRA"):
        peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, lora_bias=True)


@pytest.mark.parametrize("arch,targets", [("qwen2", ["q_proj", "v_proj"]), ("gpt2", ["c_attn", "c_fc"])])
def test_dora_merged_after_a_lora_bias_matches_unmerged(arch, targets):
    """DoRA rescales everything but the base layer's own bias, so it rescales biases merged before it."""
    model = tiny_model(arch)
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=targets, lora_bias=True, init_lora_weights=False),
                   name="a")
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=targets, use_dora=True, init_lora_weights=False),
                   name="b")
    randomize_adapter(model)  # both adapters, magnitudes too, so DoRA's scale is far from 1
    dt.set_adapter(model, ["a", "b"])
    unmerged, expected = _snapshot(model), _logits(model)
    for steps in ([["a", "b"]], [["a"], ["b"]]):  # together, and one after the other
        for names in steps:
            dt.merge(model, names, verbose=False)
        torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=1e-5)
        dt.unmerge(model)
        _assert_same(unmerged, _snapshot(model))


def test_lora_bias_without_a_base_bias_is_refused_before_any_work():
    model = tiny_model("llama")  # no biases in the projections
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_bias=True,
                                        init_lora_weights=False))
    randomize_adapter(model)
    before = _snapshot(model)
    for merge in (lambda: dt.merge(model, verbose=False), lambda: dt.unload(model, merge=True, verbose=False)):
        with pytest.raises(ValueError, match=r"lora_bias.*has no bias"):
            merge()
        _assert_same(before, _snapshot(model))
