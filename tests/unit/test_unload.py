"""unload gives back a plain transformers model; its save_pretrained output reloads with transformers alone."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import deltatune as dt
from deltatune.adapters import AdapterLayer, ModulesToSave
from tiny_models import randomize_adapter, sample_ids, tiny_model


@pytest.mark.parametrize("arch,kwargs", [
    ("llama", dict(target_modules="all-linear", use_dora=True)),
    ("gemma", dict(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])),  # tied embeddings
    ("gpt2", dict(target_modules=["c_attn", "wte"])),  # Conv1D + tied embedding
])
def test_unload_merge_saves_a_plain_model(arch, kwargs, tmp_path):
    model = tiny_model(arch)
    dt.add_adapter(model, dt.LoraConfig(r=4, init_lora_weights=False, **kwargs))
    randomize_adapter(model)
    ids = sample_ids()
    with torch.no_grad():
        expected = model(ids).logits
    plain = dt.unload(model, merge=True)
    assert not any(isinstance(m, (AdapterLayer, ModulesToSave)) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, atol=3e-5, rtol=1e-5)
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=3e-5, rtol=1e-5)


def test_unload_without_merge_returns_the_base_exactly():
    base = tiny_model("qwen2")
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                        modules_to_save=["lm_head"]))
    randomize_adapter(model)
    dt.merge(model)
    plain = dt.unload(model, merge=False)
    reference = base.state_dict()
    assert set(plain.state_dict()) == set(reference)
    assert all(torch.equal(v, reference[k]) for k, v in plain.state_dict().items())


def test_merging_a_tied_embedding_leaves_the_head_alone():
    base = tiny_model("gpt2")
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["wte"], init_lora_weights=False))
    randomize_adapter(model)
    dt.merge(model)
    assert torch.equal(model.lm_head.weight, base.lm_head.weight)
    dt.unmerge(model)
    assert model.lm_head.weight is model.transformer.wte.base_layer.weight  # tied again
