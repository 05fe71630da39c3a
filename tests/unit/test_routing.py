"""adapter_per_row: every row of one batch uses its own adapter (LoRA and DoRA alike) or none."""

import copy

import pytest
import torch

import deltatune as dt
from tiny_models import randomize_adapter, sample_ids, tiny_model


@pytest.fixture
def model_and_base():
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), name="lora")
    dt.add_adapter(model, dt.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], use_dora=True,
                                        init_lora_weights=False, modules_to_save=["lm_head"]), name="dora")
    randomize_adapter(model)
    return model, base


def _single(model, name, ids):
    dt.set_adapter(model, name)
    with torch.no_grad():
        return model(ids).logits


def test_mixed_rows_equal_single_adapter_runs(model_and_base):
    model, base = model_and_base
    ids = sample_ids(batch=4)
    names = ["lora", "dora", None, "lora"]
    # The active adapter must not leak into routed rows: "dora" (the one with a trained lm_head copy)
    # is active, yet the None row must see the original head and the "lora" rows no copy at all.
    dt.set_adapter(model, "dora")
    with dt.adapter_per_row(model, names), torch.no_grad():
        mixed = model(ids).logits
    for row, name in enumerate(names):
        outputs = {None: base(ids[row:row + 1]).logits.detach()}
        for other in ("lora", "dora"):
            outputs[other] = _single(model, other, ids[row:row + 1])
        torch.testing.assert_close(mixed[row:row + 1], outputs[name], atol=1e-5, rtol=1e-5)
        # The three choices really differ on this row, so a row sent to another adapter (or to
        # none) would fail above; comparing different rows, as before, proved nothing.
        for other in {None, "lora", "dora"} - {name}:
            assert (outputs[other] - outputs[name]).abs().max() > 1e-3, (row, name, other)


def test_mixed_rows_generate(model_and_base):
    model, _ = model_and_base
    ids = sample_ids(batch=3, length=5)
    names = ["dora", None, "lora"]
    with dt.adapter_per_row(model, names), torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, name in enumerate(names):
        dt.set_adapter(model, name)
        with torch.no_grad():
            single = model.generate(ids[row:row + 1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out[row], single[0]), (row, name)


def test_beam_search_repeats_each_rows_choice(model_and_base):
    model, _ = model_and_base
    ids = sample_ids(batch=2, length=5)
    with dt.adapter_per_row(model, ["lora", "dora"]), torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    for row, name in enumerate(["lora", "dora"]):  # both rows: each keeps its own adapter across its beams
        dt.set_adapter(model, name)
        with torch.no_grad():
            single = model.generate(ids[row:row + 1], max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
        assert torch.equal(out[row], single[0]), (row, name)


def test_a_batch_repeating_each_row_keeps_each_rows_adapter(model_and_base):
    """generate repeats each prompt in place (beams, samples): with k copies, rows i*k .. i*k+k-1 are
    prompt i's and take its adapter. Checked on one forward pass, where a mix-up cannot hide behind
    a beam search that happens to pick the same tokens."""
    model, _ = model_and_base
    ids = sample_ids(batch=2, length=5)
    with dt.adapter_per_row(model, ["lora", "dora"]), torch.no_grad():
        out = model(ids.repeat_interleave(3, dim=0)).logits
    for row, name in enumerate(["lora", "dora"]):
        expected = _single(model, name, ids[row:row + 1])
        for k in range(3):
            torch.testing.assert_close(out[3 * row + k:3 * row + k + 1], expected, atol=1e-5, rtol=1e-5)


def test_routing_errors(model_and_base):
    model, _ = model_and_base
    with pytest.raises(ValueError, match="unknown adapter"):
        with dt.adapter_per_row(model, ["nope"]):
            pass
    with pytest.raises(ValueError, match="batch has 4 rows"):
        with dt.adapter_per_row(model, ["lora", "dora", None]):
            model(sample_ids(batch=4))
    dt.merge(model, ["lora"])
    with pytest.raises(RuntimeError, match="unmerge"):
        with dt.adapter_per_row(model, ["lora"]):
            pass


def test_routing_groups_rows_not_loops(monkeypatch):
    """Rows are gathered per adapter: one adapter op per adapter, whatever the batch size."""
    from deltatune.adapters.low_rank import lora

    model = tiny_model("llama")
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), name="a")
    calls = []
    real = lora.kernels.lora_add

    def counting(x, *args):
        calls.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(lora.kernels, "lora_add", counting)
    with dt.adapter_per_row(model, ["a", None] * 8), torch.no_grad():
        model(sample_ids(batch=16))
    assert calls == [8] * len(model.model.layers)  # one q_proj per layer, 8 rows each
