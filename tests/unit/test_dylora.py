"""DyLoRA's nested ranks: each training step trains the first b components at scale alpha / b,
a cut adapter computes what a LoRA adapter of that rank computes, the cut files are PEFT's
LoRA layout, and bad ranks are refused by name."""

import copy
import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.adapter_ops import get_state
from deltatune.adapters.low_rank.dylora import DyLoraMethod, cut_to_rank, rank_at_step
from deltatune.adapters.low_rank.lora import LoraLayer
from deltatune.export.rank import export_rank
from deltatune.io import adapter_tensors, gathered_adapter_tensors
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model


def _dylora(arch="llama", **kwargs):
    base = tiny_model(arch)
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.DyLoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **kwargs}))
    randomize_adapter(model)
    return base, model


def _plain_lora_at(model, base, rank):
    """A LoRA adapter of rank ``rank`` built by hand from the DyLoRA adapter's first components."""
    lora = copy.deepcopy(base)
    dt.add_adapter(lora, dt.LoraConfig(r=rank, lora_alpha=16, target_modules="all-linear"))
    layers = {k: m for k, m in model.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        for key, layer in lora.named_modules():
            if isinstance(layer, LoraLayer):
                A, B = layers[key].full_factors("default")
                layer.set_factors("default", A[:rank], B[:, :rank])
    return lora


def test_the_ranks_drawn_are_a_function_of_seed_and_step_and_cover_the_range():
    config = dt.DyLoraConfig(r=8, r_min=2, rank_seed=5)
    drawn = [rank_at_step(config, s) for s in range(400)]
    assert drawn == [rank_at_step(dt.DyLoraConfig(r=8, r_min=2, rank_seed=5), s) for s in range(400)]
    assert set(drawn) == set(range(2, 9))
    assert min(Counter(drawn).values()) > 25  # uniform: about 57 each
    assert drawn != [rank_at_step(dt.DyLoraConfig(r=8, r_min=2, rank_seed=6), s) for s in range(400)]


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_a_cut_adapter_computes_the_lora_adapter_of_that_rank(rank):
    base, model = _dylora()
    ids = sample_ids()
    dt.set_adapter_rank(model, rank)
    expected = eval_logits(_plain_lora_at(model, base, rank), ids)
    torch.testing.assert_close(eval_logits(model, ids), expected, atol=1e-6, rtol=1e-5)
    dt.set_adapter_rank(model, None)
    full = eval_logits(model, ids)
    assert (full - expected).abs().max() > 1e-4 or rank == 8


def test_a_training_step_uses_the_drawn_rank_at_alpha_over_rank():
    base, model = _dylora()
    ids = sample_ids(batch=2, length=6)
    config = dt.DyLoraConfig(r=8, lora_alpha=16, target_modules="all-linear", rank_seed=1)
    step = next(s for s in range(100) if rank_at_step(config, s) == 3)
    DyLoraMethod().before_step(model, "default", config, step)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            A, B = module.full_factors("default")
            assert A.grad[:3].abs().sum() > 0 and B.grad[:, :3].abs().sum() > 0
            assert torch.equal(A.grad[3:], torch.zeros_like(A.grad[3:]))  # components past b take no part
            assert torch.equal(B.grad[:, 3:], torch.zeros_like(B.grad[:, 3:]))
    # the same forward as a rank-3 LoRA adapter (scale 16 / 3) in training mode without dropout
    lora = _plain_lora_at(model, base, 3).train()
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, lora(input_ids=ids, labels=ids).loss)
    model.eval()  # outside training the adapter runs at all r (or its rank limit)
    dt.set_adapter_rank(model, 8)
    torch.testing.assert_close(eval_logits(model, ids), eval_logits(_plain_lora_at(model, base, 8), ids))


def test_layers_of_a_smaller_rank_keep_theirs():
    base, model = _dylora(rank_pattern={"q_proj": 2})
    ids = sample_ids()
    dt.set_adapter_rank(model, 4)
    cut = eval_logits(model, ids)
    config = get_state(model).configs["default"]
    lora_config, tensors = cut_to_rank(config, gathered_adapter_tensors(model, "default"), 4)
    assert lora_config.r == 4 and lora_config.rank_pattern == {"q_proj": 2}
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 2
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].shape[0] == 4
    lora = copy.deepcopy(base)
    dt.add_adapter(lora, lora_config)
    with torch.no_grad():
        for key, target in adapter_tensors(lora, "default").items():
            target.copy_(tensors[key])
    torch.testing.assert_close(eval_logits(lora, ids), cut, atol=1e-6, rtol=1e-5)


def test_save_at_a_rank_writes_a_plain_lora_adapter(tmp_path):
    base, model = _dylora()
    ids = sample_ids()
    dt.save_adapter(model, tmp_path / "full")
    full = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert full["peft_type"] == "DYLORA" and full["r"] == 8 and full["r_min"] == 1
    dt.save_adapter(model, tmp_path / "r4", rank=4)
    export_rank(str(tmp_path / "full"), str(tmp_path / "r4-from-files"), 4)
    for folder in ("r4", "r4-from-files"):
        config = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 4 and "r_min" not in config
        tensors = load_file(tmp_path / folder / "adapter_model.safetensors")
        assert all(t.shape[0] == 4 for k, t in tensors.items() if k.endswith("lora_A.weight"))
        assert all(t.shape[1] == 4 for k, t in tensors.items() if k.endswith("lora_B.weight"))
        reloaded = dt.load_adapter(copy.deepcopy(base), tmp_path / folder)
        dt.set_adapter_rank(model, 4)
        torch.testing.assert_close(eval_logits(reloaded, ids), eval_logits(model, ids), atol=1e-6, rtol=1e-5)
        dt.set_adapter_rank(model, None)


def test_merging_a_cut_adapter_folds_in_that_rank():
    _, model = _dylora()
    ids = sample_ids()
    dt.set_adapter_rank(model, 2)
    cut = eval_logits(model, ids)
    dt.merge(model, verbose=False)
    torch.testing.assert_close(eval_logits(model, ids), cut, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="merged"):
        dt.set_adapter_rank(model, 4)
    dt.unmerge(model)
    assert torch.equal(eval_logits(model, ids), cut)


def test_bad_ranks_and_settings_are_refused_by_name(tmp_path):
    _, model = _dylora()
    with pytest.raises(ValueError, match="from 1 to the adapter's r=8"):
        dt.set_adapter_rank(model, 9)
    with pytest.raises(ValueError, match="from 1 to the adapter's r=8"):
        dt.save_adapter(model, tmp_path / "x", rank=0)
    with pytest.raises(ValueError, match="r_min"):
        dt.DyLoraConfig(r=4, r_min=5)
    with pytest.raises(ValueError, match="use_dora"):
        dt.DyLoraConfig(r=4, use_dora=True)
    with pytest.raises(ValueError, match="init_lora_weights"):
        dt.DyLoraConfig(r=4, init_lora_weights="pissa")
    lora = tiny_model("llama")
    dt.add_adapter(lora, dt.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="only a DyLoRA adapter"):
        dt.set_adapter_rank(lora, 2)
    dt.save_adapter(lora, tmp_path / "lora")
    with pytest.raises(ValueError, match="only a DyLoRA adapter"):
        export_rank(str(tmp_path / "lora"), str(tmp_path / "cut"), 2)
    dt.save_adapter(model, tmp_path / "dy")
    with pytest.raises(ValueError, match="own folder"):
        export_rank(str(tmp_path / "dy"), str(tmp_path / "dy"), 2)
    with pytest.raises(FileNotFoundError):
        export_rank(str(tmp_path / "missing"), str(tmp_path / "cut"), 2)
