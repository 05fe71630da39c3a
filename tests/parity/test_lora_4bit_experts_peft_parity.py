"""LoRA on 4-bit (NF4, double-quantized) fused expert weights: PEFT's ``target_parameters`` on
bitsandbytes' 4-bit parameters (``replace_parameter_4bit``) against deltatune's on its own 4-bit
experts (the same bytes), on tiny Qwen3-MoE, Mixtral, gpt-oss and OLMoE models. Files go both ways
with equal logits and the gradients of one step agree; the grouped compute keeps no decoded weight
for backward; merging (kept in full precision or re-quantized) unmerges bit for bit and
``disable_adapters`` sees the base; several adapters route per row.

PEFT 0.21.2 on parametrized 4-bit parameters has two faults, so the comparisons stay where it is
right: it leaves its per-expert LoRA parametrization in place after each forward pass (it removes
only its other kind), so a model's logits are right on its first pass only, and each comparison
uses a freshly loaded PEFT model for one pass; and with two parametrized parameters of one module
(nested wrappers) even the first pass is off, so a file adapting both is compared with PEFT's file
layout and with deltatune's own path on the decoded weights instead."""

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.adapters.low_rank.moe_experts import expert_layers
from deltatune.io import adapter_tensors
from deltatune.quant.experts import install_float, packed_bytes, quantize_experts, quantized_experts
from deltatune.targeting_experts import expert_parameters
from peft_roundtrip import assert_same_gradients
from tiny_models import eval_logits, randomize_adapter, sample_ids
from tiny_moe import BNB_WIDTHS, MOE_ARCHS, tiny_moe

peft = pytest.importorskip("peft")
bnb_parametrize = pytest.importorskip("bitsandbytes.nn.parametrize")

ATOL = 1e-5


def _ours(arch: str):
    model = tiny_moe(arch, widths=BNB_WIDTHS)
    quantize_experts(model, "nf4", 64, True)
    return model


def _bnb(arch: str):
    model = tiny_moe(arch, widths=BNB_WIDTHS)
    for key, name in expert_parameters(model):
        bnb_parametrize.replace_parameter_4bit(model.get_submodule(key), name, compress_statistics=True,
                                               quant_type="nf4", blocksize=64)
    return model


BOTH = ("gate_up_proj", "down_proj")


def _fields(params=BOTH) -> dict:
    # PEFT matches a parametrized parameter by its full name only
    targets = [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in params]
    return dict(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=targets)


def _peft_once(arch: str, folder, ids, trainable: bool = False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(_bnb(arch), folder, is_trainable=trainable)
    return model, eval_logits(model, ids)


@pytest.mark.parametrize("param", BOTH)
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_peft_file_loads_with_equal_logits(arch, param, tmp_path, parity_results):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_bnb(arch), peft.LoraConfig(**_fields([param])))
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    ids = sample_ids()
    _, expected = _peft_once(arch, tmp_path, ids)
    base = eval_logits(_ours(arch), ids)
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the output
    ours = dt.load_adapter(_ours(arch), tmp_path)
    diff = parity_results[f"lora-4bit-experts {arch} {param}: PEFT file -> deltatune"] = \
        (eval_logits(ours, ids) - expected).abs().max().item()
    assert diff <= ATOL
    assert torch.equal(eval_logits(ours, ids), eval_logits(ours, ids))  # the same on every pass
    assert all(layer.last_path == ("grouped", "4-bit expert weights") for _, layer in expert_layers(ours))


@pytest.mark.parametrize("param", BOTH)
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_deltatune_file_loads_in_peft_with_equal_logits(arch, param, tmp_path, parity_results):
    ours = _ours(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dt.add_adapter(ours, dt.LoraConfig(**_fields([param])))
    randomize_adapter(ours)
    dt.save_adapter(ours, tmp_path)
    ids = sample_ids()
    _, theirs = _peft_once(arch, tmp_path, ids)
    diff = parity_results[f"lora-4bit-experts {arch} {param}: deltatune file -> PEFT"] = \
        (eval_logits(ours, ids) - theirs).abs().max().item()
    assert diff <= ATOL


@pytest.mark.parametrize("arch, param", [("qwen3_moe", "gate_up_proj"), ("gpt_oss", "down_proj")])
def test_same_gradients_as_peft(arch, param, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = peft.get_peft_model(_bnb(arch), peft.LoraConfig(**_fields([param])))
        randomize_adapter(first)
        first.save_pretrained(tmp_path)
        theirs = peft.PeftModel.from_pretrained(_bnb(arch), tmp_path, is_trainable=True)  # fresh: one pass
    ours = dt.load_adapter(_ours(arch), tmp_path, trainable=True)
    assert_same_gradients(theirs, ours, sample_ids(), atol=1e-5, rtol=1e-4, nonzero=True,
                          their_name=lambda n: n.replace(".default", ""), our_name=lambda n: n,
                          our_tensors=lambda m: adapter_tensors(m, "default"))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_both_parameters_either_nesting_and_decoded_path(arch, tmp_path, parity_results):
    """Both expert weights of a module. PEFT nests parameters it finds parametrized (a bitsandbytes
    4-bit base) in name order, plain ones in the module's order; deltatune writes the module's order
    on either base, so a file trained on 4-bit experts loads on the original full-precision model (in
    PEFT too), and reads PEFT's 4-bit nesting as well. The 4-bit grouped compute equals deltatune's
    on the decoded weights in full precision."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_bnb(arch), peft.LoraConfig(**_fields()))
    randomize_adapter(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    their_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    inner = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"
    assert their_file[inner].shape[1] == BNB_WIDTHS[1]  # PEFT on 4 bits: down_proj (in: the intermediate width) inside
    ours = dt.load_adapter(_ours(arch), tmp_path / "peft")
    ids = sample_ids()
    four_bit = eval_logits(ours, ids)
    dt.save_adapter(ours, tmp_path / "ours")
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(our_file) == sorted(their_file) and our_file[inner].shape[1] == BNB_WIDTHS[0]  # the module's order
    assert dt.load_adapter(_ours(arch), tmp_path / "ours") is not None  # and that reads back too
    decoded = copy.deepcopy(ours)
    for key, name, found in quantized_experts(decoded):
        module = decoded.get_submodule(key)
        install_float(module, name, found(packed_bytes(module, name)))
    assert not quantized_experts(decoded) and len(quantized_experts(ours)) == 4  # the copy alone changed
    diff = parity_results[f"lora-4bit-experts {arch} both: 4-bit vs decoded weights"] = \
        (eval_logits(decoded, ids) - four_bit).abs().max().item()
    assert diff <= ATOL
    # a file written on the 4-bit base loads on the full-precision base, in deltatune and in PEFT
    full = tiny_moe(arch, widths=BNB_WIDTHS)
    on_full = dt.load_adapter(copy.deepcopy(full), tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_full = peft.PeftModel.from_pretrained(copy.deepcopy(full), tmp_path / "ours")
    torch.testing.assert_close(eval_logits(on_full, ids), eval_logits(peft_full, ids), atol=ATOL, rtol=0)
    assert (eval_logits(on_full, ids) - four_bit).abs().max() < 0.5  # NF4's error, not a wrong layout


def _saved_in_training_step(model) -> list[tuple[tuple, torch.dtype]]:
    """(shape, dtype) of every tensor autograd keeps for backward in one training step."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=sample_ids(), labels=sample_ids()).loss
    loss.backward()
    return saved


@pytest.mark.parametrize("four_bit", [True, False])
def test_no_decoded_weight_is_kept_for_backward(four_bit):
    model = _ours("qwen3_moe")
    weights = {found.shape for _, _, found in quantized_experts(model)}
    weights |= {(e, i, o) for e, o, i in weights}  # either reading of an expert weight
    if not four_bit:  # the same weights in full precision: the grouped matmul keeps them (what 4 bits avoid)
        for key, name, found in quantized_experts(model):
            module = model.get_submodule(key)
            install_float(module, name, found(packed_bytes(module, name)))
    dt.add_adapter(model, dt.LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj",
                                                                                  "mlp.experts.down_proj"]))
    randomize_adapter(model)  # B nonzero, so A gets a gradient too
    saved = _saved_in_training_step(model)
    kept = [shape for shape, dtype in saved if dtype.is_floating_point and shape in weights]
    assert bool(kept) != four_bit
    if four_bit:
        assert any(dtype == torch.uint8 for _, dtype in saved)  # the packed bytes, decoded again in backward
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and "experts" in n]
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("requantize", [False, True])
def test_merge_unmerge_exact_and_disable_sees_the_base(requantize):
    model = _ours("mixtral")
    dt.add_adapter(model, dt.LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj",
                                                                                  "mlp.experts.down_proj"]))
    randomize_adapter(model)
    ids = sample_ids()
    adapted = eval_logits(model, ids)
    with dt.disable_adapters(model):
        base = eval_logits(model, ids)
    stored = {(k, n): packed_bytes(model.get_submodule(k), n).clone() for k, n, _ in quantized_experts(model)}
    dt.merge(model, requantize=requantize, verbose=False)
    assert len(quantized_experts(model)) == (4 if requantize else 0)
    merged = eval_logits(model, ids)
    # in full precision the merge is the adapted model; re-quantized it carries NF4's rounding, well
    # below what the adapter changes (the mean, not the worst logit: one rounding can flip a few)
    if requantize:
        error, effect = (merged - adapted).abs().mean(), (adapted - base).abs().mean()
        assert 0 < error < effect / 1.5  # a merge that did nothing would be off by the whole effect
    else:
        torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    with dt.disable_adapters(model):
        assert torch.equal(eval_logits(model, ids), base)
    assert torch.equal(eval_logits(model, ids), merged)  # put back as it was, not merged again
    dt.unmerge(model)
    assert sorted(stored) == sorted((k, n) for k, n, _ in quantized_experts(model))
    for (key, name), packed in stored.items():
        assert torch.equal(packed_bytes(model.get_submodule(key), name), packed)
    assert torch.equal(eval_logits(model, ids), adapted)


def test_full_weight_path_is_refused_for_4bit_experts():
    model = _ours("olmoe")
    dt.add_adapter(model, dt.LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.down_proj"]))
    for _, layer in expert_layers(model):
        layer.compute = "full"
    with pytest.raises(ValueError, match="stored in 4 bits, which only the grouped path computes"):
        model(sample_ids())


def test_per_row_routing_through_4bit_experts():
    model = _ours("qwen3_moe")
    fields = dict(r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj",
                                                                      "mlp.experts.down_proj"],
                  init_lora_weights=False)
    dt.add_adapter(model, dt.LoraConfig(**fields), name="a")
    dt.add_adapter(model, dt.LoraConfig(**{**fields, "r": 3}), name="b")
    ids = sample_ids()
    alone = []
    for name in ("a", None, "b"):
        dt.set_adapter(model, name)
        alone.append(eval_logits(model, ids))
    dt.set_adapter(model, ["a", "b"])
    with dt.adapter_per_row(model, ["a", None, "b"]):
        routed = eval_logits(model, ids)
    assert (alone[0] - alone[2]).abs().max() > 1e-2
    for i in range(3):
        torch.testing.assert_close(routed[i], alone[i][i], atol=ATOL, rtol=0)
