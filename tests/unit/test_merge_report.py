"""Every merge reports its error against the unmerged model; the errors stay within the stated bounds.

Stated bounds (README): merging into full-precision weights, or into a quantized base kept in
full precision afterwards, changes logits by at most 1e-4 x max(1, max |logit|) (float32
rounding). Re-quantizing the merged weights adds quantization rounding: on these models at most
3x the error the base's own quantization causes on the same probe.
"""

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune import quant
from deltatune.merge_report import probe_ids
from tiny_models import randomize_adapter, saved_tiny_llama_64, tiny_model

REQUANTIZE_FACTOR = 3.0


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_report_numbers_are_the_measured_difference(capsys):
    model = tiny_model("llama")
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    randomize_adapter(model)
    ids = probe_ids(model)
    before = _logits(model, ids)
    report = dt.merge(model)
    after = _logits(model, ids)
    assert "max |Δlogit|" in capsys.readouterr().out  # printed, not only returned
    assert report.tokens == ids.shape[1]
    assert report.max_logit_diff == pytest.approx((after - before).abs().max().item(), abs=1e-9)
    assert report.mean_logit_diff == pytest.approx((after - before).abs().mean().item(), abs=1e-9)
    loss = nn.functional.cross_entropy(before[0, :-1], ids[0, 1:])
    assert report.perplexity_before == pytest.approx(loss.exp().item(), rel=1e-5)
    assert report.within_float_rounding and report.max_abs_logit > 0


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_quantized_merge_errors_within_bounds(tmp_path, quant_type, use_dora):
    folder = saved_tiny_llama_64(tmp_path)
    full, _ = dt.load_model(folder)
    model, _ = dt.load_model(folder, quantize=quant_type)
    ids = probe_ids(model)
    base_error = (_logits(model, ids) - _logits(full, ids)).abs().max().item()
    dt.add_adapter(model, dt.LoraConfig(r=8, target_modules="all-linear", use_dora=use_dora))
    randomize_adapter(model)
    tuned = _logits(model, ids)
    exact = copy.deepcopy(model)

    report = dt.merge(exact, verbose=False)
    assert not report.requantized and report.within_float_rounding
    assert not quant.quantized_layers(exact) or all(
        not isinstance(layer.base_layer, quant.QuantLinear) for _, layer in dt.adapter_ops.adapter_layers(exact))

    report = dt.merge(model, requantize=True, verbose=False)
    assert report.requantized
    wrapped = model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped.base_layer, quant.QuantLinear)  # still stored quantized
    assert 0 < report.max_logit_diff <= REQUANTIZE_FACTOR * base_error
    dt.unmerge(model)
    assert torch.equal(_logits(model, ids), tuned)  # the original quantized bytes are back


def test_unload_prints_the_merge_error(capsys):
    model = tiny_model("qwen2")
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_adapter(model)
    dt.unload(model, merge=True)
    assert "max |Δlogit|" in capsys.readouterr().out
