"""4-bit fused expert weights (quant/experts.py): bitsandbytes' bytes and state-dict layout, blocks
that never span two experts, the decoded weight read once per call, device and dtype moves, storage
counted as quantized, saving and loading (also while quantizing from a float folder), dequantizing."""

import copy
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.quant import QuantizeConfig, dequantize_model, memory_report, quantize_model, save_model
from deltatune.quant.blockwise import quantize_4bit
from deltatune.quant.experts import Dequantize4bit, packed_bytes, quantize_experts, quantized_experts
from deltatune.targeting_experts import expert_parameters, matched_parameters
from tiny_models import eval_logits, sample_ids
from tiny_moe import BNB_WIDTHS, EXPERT_TARGETS, MOE_ARCHS, tiny_moe, tiny_moe_dir


def _bnb_quantized(model):
    bnb_parametrize = pytest.importorskip("bitsandbytes.nn.parametrize")
    for key, name in expert_parameters(model):
        bnb_parametrize.replace_parameter_4bit(model.get_submodule(key), name, compress_statistics=True,
                                               quant_type="nf4", blocksize=64)
    return model


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_same_bytes_keys_and_logits_as_bitsandbytes(arch):
    ours = tiny_moe(arch, widths=BNB_WIDTHS)
    names = quantize_experts(ours, "nf4", 64, True)
    assert len(names) == 4 and all(n.endswith(("gate_up_proj", "down_proj")) for n in names)
    theirs = _bnb_quantized(tiny_moe(arch, widths=BNB_WIDTHS))
    ours_sd = {k: v for k, v in ours.state_dict().items() if ".experts." in k}
    theirs_sd = {k: v for k, v in theirs.state_dict().items() if ".experts." in k}
    assert sorted(ours_sd) == sorted(theirs_sd)
    assert "model.layers.0.mlp.experts.gate_up_proj.quant_state.bitsandbytes__nf4" in ours_sd
    for key, value in theirs_sd.items():
        assert torch.equal(ours_sd[key], value), key
    ids = sample_ids()
    assert torch.equal(eval_logits(ours, ids), eval_logits(theirs, ids))
    # what was quantized is no longer a float parameter, and targeting still finds it by name
    assert not any(p.dtype.is_floating_point and p.dim() == 3 for n, p in ours.named_parameters() if "experts" in n)
    assert sorted(f"{m}.{p}" for m, p in matched_parameters(ours, EXPERT_TARGETS)) == sorted(names)


def test_blocks_never_span_two_experts():
    model = tiny_moe("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    weight = experts.down_proj.detach().clone()  # (4, 32, 16): 512 values per expert
    quantize_experts(model, "nf4", 64, double_quant=False)
    found = [f for k, n, f in quantized_experts(model) if k == "model.layers.0.mlp.experts" and n == "down_proj"][0]
    blocks = weight[0].numel() // 64
    for e in range(weight.shape[0]):  # each expert's scales are those of quantizing it alone
        _, alone = quantize_4bit(weight[e], "nf4", 64, False)
        assert torch.equal(found.quant_state.absmax[e * blocks:(e + 1) * blocks], alone.absmax)
    odd = tiny_moe("qwen3_moe")
    with pytest.raises(ValueError, match=r"down_proj: each expert holds 512 values, not a multiple of the block "
                                         r"size 1024"):
        quantize_experts(odd, "nf4", 1024)


def test_decoded_once_per_call_and_not_kept(monkeypatch):
    model = tiny_moe("qwen3_moe")
    model.config._experts_implementation = "eager"  # transformers' loop reads the weight once per expert
    quantize_experts(model)
    calls = []
    import deltatune.quant.experts as experts_module

    original = experts_module.dequantize_4bit
    monkeypatch.setattr(experts_module, "dequantize_4bit", lambda *a, **k: calls.append(1) or original(*a, **k))
    eval_logits(model, sample_ids())
    assert len(calls) == 4  # 2 layers x 2 weights, whatever the number of experts
    assert all(f.decoded is None and not f.caching for _, _, f in quantized_experts(model))  # none kept


def test_storage_counted_as_quantized_and_moves_with_the_model():
    model = tiny_moe("mixtral")
    plain = memory_report(model)
    quantize_experts(model)
    report = memory_report(model)
    assert report.quantized_parameters == 2 * (4 * 32 * 32 + 4 * 32 * 16)
    assert 4.0 < report.bits_per_parameter < 4.3  # 4 bits plus double-quantized scales
    assert report.full_precision_parameters == plain.full_precision_parameters - report.quantized_parameters
    ids = sample_ids()
    before = eval_logits(model, ids)
    packed = packed_bytes(model.model.layers[0].mlp.experts, "gate_up_proj").clone()
    model.to(torch.bfloat16)  # the bytes stay; the decoded dtype follows
    experts = model.model.layers[0].mlp.experts
    assert torch.equal(packed_bytes(experts, "gate_up_proj"), packed)
    assert experts.gate_up_proj.dtype == torch.bfloat16
    model.to(torch.float32)
    torch.testing.assert_close(eval_logits(model, ids), before, atol=5e-2, rtol=0)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_save_and_load_quantized_folders(arch, tmp_path):
    from transformers import AutoTokenizer

    from deltatune.loading import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    tiny_moe_dir(tmp_path / "float", tokenizer, arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = dt.load_model(tmp_path / "float", quantize="nf4")  # quantized while reading, tensor by tensor
        reference, _ = dt.load_model(tmp_path / "float")
    quantize_model(reference, QuantizeConfig("nf4", compute_dtype=torch.float32))
    assert len(quantized_experts(model)) == 4
    ids = sample_ids()
    logits = eval_logits(model, ids)
    assert torch.equal(logits, eval_logits(reference, ids))
    save_model(model, tmp_path / "nf4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again, _ = dt.load_model(tmp_path / "nf4")
    assert len(quantized_experts(again)) == 4
    assert torch.equal(eval_logits(again, ids), logits)


def test_int8_keeps_experts_in_full_precision_and_says_so():
    model = tiny_moe("olmoe")
    with pytest.warns(UserWarning, match="quantize=int8 keeps the 4 fused expert weights"):
        quantize_model(model, QuantizeConfig("int8"))
    assert not quantized_experts(model)


def test_dequantize_model_gives_plain_parameters():
    model = tiny_moe("olmoe")
    quantize_model(model, QuantizeConfig("nf4"))
    experts = model.model.layers[1].mlp.experts
    decoded = experts.gate_up_proj.clone()
    ids = sample_ids()
    before = eval_logits(model, ids)
    dequantize_model(copy.deepcopy(model))  # a copy: the original keeps its 4-bit experts
    assert len(quantized_experts(model)) == 4
    dequantize_model(model)
    assert not quantized_experts(model)
    assert isinstance(experts.gate_up_proj, torch.nn.Parameter) and torch.equal(experts.gate_up_proj, decoded)
    torch.testing.assert_close(eval_logits(model, ids), before, atol=1e-6, rtol=0)


def test_qlora_on_4bit_experts_trains(tmp_path, default_tokenizer):
    """deltatune train --quantize nf4 --lora.target-experts: the experts are stored in 4 bits, LoRA on
    them trains through the grouped compute, and the adapter file is PEFT's layout."""
    import json

    from deltatune.train import load_config, train
    from tiny_models import word_meaning_data

    folder = tiny_moe_dir(tmp_path / "model", default_tokenizer, "qwen3_moe")
    data = word_meaning_data(tmp_path / "data.jsonl", 24)
    lines = []
    summary = train(load_config(None, {"model": str(folder), "data.path": str(data), "batch_size": 4,
                                       "max_steps": 4, "eval_steps": 2, "seed": 3, "quantize": "nf4",
                                       "output_dir": str(tmp_path / "run"), "lora.target_modules": ["q_proj"],
                                       "lora.target_experts": True, "lr": 5e-3}), log=lines.append)
    assert summary["final_validation_loss"] < summary["initial_validation_loss"]
    assert any("4bit" in str(line) and "quantized parameters" in str(line) for line in lines)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == EXPERT_TARGETS


# ----- corners: copies, casts, interrupted calls, saved folders, kept modules, nesting order --------------
def _with_adapter(arch: str, targets):
    model = tiny_moe(arch)
    quantize_experts(model)
    dt.add_adapter(model, dt.LoraConfig(r=2, target_modules=[], target_parameters=targets))
    from tiny_models import randomize_adapter

    randomize_adapter(model)
    return model


def test_a_copy_changed_after_a_partial_merge_leaves_the_original_working():
    model = _with_adapter("qwen3_moe", ["mlp.experts.down_proj"])
    ids = sample_ids()
    dt.merge(model, verbose=False)  # down_proj now full precision, gate_up_proj still 4-bit
    merged = eval_logits(model, ids)
    copy_ = copy.deepcopy(model)
    dt.unmerge(copy_)  # re-registers down_proj in 4 bits on the copy only
    assert torch.equal(eval_logits(model, ids), merged)
    assert len(quantized_experts(copy_)) == 4 and len(quantized_experts(model)) == 2


def test_unmerge_and_disable_after_a_cast_use_the_new_dtype():
    model = _with_adapter("mixtral", EXPERT_TARGETS)
    never_merged = copy.deepcopy(model).to(torch.bfloat16)
    ids = sample_ids()
    dt.merge(model, requantize=True, verbose=False)
    model.to(torch.bfloat16)
    with dt.disable_adapters(model):
        base = eval_logits(model, ids)
    with dt.disable_adapters(never_merged):
        assert torch.equal(base, eval_logits(never_merged, ids))
    dt.unmerge(model)
    assert all(f.compute_dtype == torch.bfloat16 for _, _, f in quantized_experts(model))
    assert torch.equal(eval_logits(model, ids), eval_logits(never_merged, ids))


def test_an_interrupted_call_leaves_nothing_decoded_behind(monkeypatch):
    model = tiny_moe("olmoe")
    quantize_experts(model)
    original = Dequantize4bit.forward

    def interrupt(self, packed):
        raise KeyboardInterrupt  # not an Exception: PyTorch skips the always-called hooks for it

    monkeypatch.setattr(Dequantize4bit, "forward", interrupt)
    with pytest.raises(KeyboardInterrupt):
        eval_logits(model, sample_ids())
    monkeypatch.setattr(Dequantize4bit, "forward", original)
    eval_logits(model, sample_ids())
    assert all(f.decoded is None and not f.caching for _, _, f in quantized_experts(model))
    assert not torch.nn.utils.parametrize._cache_enabled  # PyTorch's process-wide cache is never used


def test_saved_folders_carry_every_quantization_table_for_bitsandbytes(tmp_path):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    from safetensors.torch import load_file

    model = tiny_moe("qwen3_moe")
    quantize_model(model, QuantizeConfig("nf4"))
    save_model(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    records = [k[: -len(".quant_state.bitsandbytes__nf4")] for k in tensors if k.endswith("bitsandbytes__nf4")]
    assert len(records) == 2 * (2 + 4)  # per layer: the two expert weights and the four attention linears
    for key in records:
        entries = {k[len(key) + 1:]: v for k, v in tensors.items() if k.startswith(key + ".")}
        assert {"absmax", "quant_map", "nested_absmax", "nested_quant_map"} <= set(entries), key
        state = bnb_functional.QuantState.from_dict(entries, device=torch.device("cpu"))
        weight = bnb_functional.dequantize_4bit(tensors[key], state)
        assert weight.shape == state.shape


def test_kept_modules_keep_their_experts_in_full_precision():
    model = tiny_moe("qwen3_moe")
    quantize_model(model, QuantizeConfig("nf4", keep=["model.layers.0.mlp.experts", "layers.1.mlp.experts.down_proj"]))
    assert [(k, n) for k, n, _ in quantized_experts(model)] == [("model.layers.1.mlp.experts", "gate_up_proj")]


def test_nesting_order_survives_merging_one_weight():
    from deltatune.targeting_experts import own_parameters

    model = _with_adapter("qwen3_moe", ["mlp.experts.gate_up_proj"])
    experts = model.model.layers[0].mlp.experts.base_layer
    dt.merge(model, verbose=False)
    dt.unmerge(model)  # gate_up_proj registered again, after down_proj
    assert [n for n, _ in own_parameters(experts)] == ["gate_up_proj", "down_proj"]
