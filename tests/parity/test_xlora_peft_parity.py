"""PEFT parity for X-LoRA: the same LoRA expert folders and the same classifier weights give the
same logits and classifier gradients in PEFT and deltatune; each tool loads the other's files;
the files carry PEFT's keys, shapes, dtypes and config fields.

PEFT 0.21.2 writes an incomplete classifier (its adapter-name filter drops keys containing
".0.", ".1.", ... when the experts are named "0", "1", ...), so the PEFT -> deltatune direction
completes PEFT's file with the classifier's full state under PEFT's own keys, and checks that
deltatune refuses PEFT's file as written."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from tiny_models import eval_logits, sample_ids, tiny_model

peft = pytest.importorskip("peft")

# case -> (architecture, expert LoRA configs (PEFT LoraConfig fields), X-LoRA fields)
CASES = {
    "llama-depth1": ("llama", [dict(target_modules=["q_proj", "v_proj"], r=4),
                               dict(target_modules=["v_proj", "down_proj"], r=2, lora_alpha=4)], {}),
    "llama-depth3-layerwise-topk": (
        "llama", [dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4),
                  dict(target_modules=["v_proj", "up_proj"], r=2),
                  dict(target_modules=["k_proj", "o_proj"], r=2)],
        dict(xlora_depth=3, xlora_size=8, xlora_dropout_p=0.0, layerwise_scalings=True, top_k_lora=2,
             enable_softmax=False, enable_softmax_topk=True)),
    "qwen2-bias-pass-value": (
        "qwen2", [dict(target_modules=["q_proj", "k_proj"], r=4, lora_bias=True),
                  dict(target_modules=["embed_tokens", "up_proj"], r=2)],
        dict(xlora_depth=2, xlora_size=8, scaling_pass_value=0.5, global_scaling_weight=0.7,
             softmax_temperature=0.5)),
}
# No GPT-2 case: PEFT 0.21.2's X-LoRA rewrites expert keys to "model.model.<...>", which GPT-2's
# "transformer.h.<...>" modules never match (it raises "Got unexpected keys").
ATOL = 1e-5


def _base(case):
    base = tiny_model(CASES[case][0])
    base.config.use_cache = False  # PEFT's X-LoRA refuses a model that caches keys and values
    return base


def _experts(case, base, folder):
    """Random LoRA experts saved by PEFT under folder/lora<i>; returns {"0": path, ...} (PEFT's names)."""
    adapters = {}
    for i, fields in enumerate(CASES[case][1]):
        torch.manual_seed(10 + i)
        lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **fields))
        if fields.get("lora_bias"):
            with torch.no_grad():
                for n, p in lora.named_parameters():
                    if n.endswith("lora_B.default.bias"):
                        p.normal_(0, 0.1)
        lora.save_pretrained(folder / f"lora{i}")
        adapters[str(i)] = str(folder / f"lora{i}")
    return adapters


def _peft_xlora(base, adapters, case):
    config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size, adapters=adapters,
                              **CASES[case][2])
    torch.manual_seed(3)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # a classifier far from uniform, so the mixture really varies per token
        for p in model.base_model.internal_xlora_classifier.parameters():
            p.normal_(0, 0.5)
    return model


def _classifier_state(peft_model):
    """PEFT's classifier tensors under the keys its files use."""
    return {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "internal_xlora_classifier" in k}


def _ours(base, adapters, case, state=None):
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.XLoraConfig(adapters=adapters, **CASES[case][2]))
    if state is not None:
        classifier = model.deltatune_xlora.classifiers["default"]
        classifier.load_state_dict({k.split("internal_xlora_classifier.")[1]: v for k, v in state.items()})
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_experts_and_classifier_same_logits_and_gradients(case, tmp_path, parity_results):
    base = _base(case)
    adapters = _experts(case, base, tmp_path)
    theirs = _peft_xlora(base, adapters, case)
    ours = _ours(base, adapters, case, _classifier_state(theirs))
    ids = sample_ids()
    expected = eval_logits(theirs, ids)
    assert (expected - eval_logits(base, ids)).abs().max() > 1e-2
    diff = (eval_logits(ours, ids) - expected).abs().max().item()
    parity_results[f"xlora {case}: same experts and classifier"] = diff
    assert diff <= ATOL
    # one backward step (eval mode: the classifier's dropout off on both sides)
    for model in (theirs, ours):
        model.eval()
        model(input_ids=ids, labels=ids).loss.backward()
    their_grads = {n.split("internal_xlora_classifier.")[1]: p.grad for n, p in theirs.named_parameters()
                   if p.requires_grad}
    our_grads = {n.split("classifiers.default.")[1]: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(our_grads) == set(their_grads)
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_deltatune_loads(case, tmp_path, parity_results):
    base = _base(case)
    theirs = _peft_xlora(base, _experts(case, base, tmp_path), case)
    folder = tmp_path / "peft_xlora"
    theirs.save_pretrained(folder)
    saved = load_file(folder / "adapter_model.safetensors")
    if set(saved) != set(_classifier_state(theirs)):  # PEFT 0.21.2 left tensors out: refused, named
        with pytest.raises(ValueError, match="missing"):
            dt.load_adapter(copy.deepcopy(base), folder)
    save_file(_classifier_state(theirs), folder / "adapter_model.safetensors")  # PEFT's keys, every tensor
    ours = copy.deepcopy(base)
    # PEFT's expert sub-folders lack tensors too (".1." of "layers.1" for expert "0"): deltatune warns and
    # reads those experts from the paths in the config's "adapters", as PEFT reads them at load time
    with pytest.warns(UserWarning, match="reading expert"):
        dt.load_adapter(ours, folder)
    ids = sample_ids()
    diff = (eval_logits(ours, ids) - eval_logits(theirs, ids)).abs().max().item()
    parity_results[f"xlora {case}: PEFT file -> deltatune"] = diff
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_saves_peft_loads(case, tmp_path, parity_results):
    base = _base(case)
    adapters = _experts(case, base, tmp_path)
    ours = _ours(base, adapters, case)
    torch.manual_seed(4)
    with torch.no_grad():
        for p in ours.deltatune_xlora.classifiers["default"].parameters():
            p.normal_(0, 0.5)
    folder = tmp_path / "ours"
    dt.save_adapter(ours, folder)
    # PEFT reads the experts from the paths given at load time: the sub-folders deltatune wrote
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder,
                                            adapters={name: str(folder / name) for name in adapters})
    ids = sample_ids()
    expected = eval_logits(ours, ids)
    assert (expected - eval_logits(base, ids)).abs().max() > 1e-2
    diff = (eval_logits(theirs, ids) - expected).abs().max().item()
    parity_results[f"xlora {case}: deltatune file -> PEFT"] = diff
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_have_peft_keys_shapes_dtypes_and_config_fields(case, tmp_path):
    base = _base(case)
    adapters = _experts(case, base, tmp_path)
    theirs = _peft_xlora(base, adapters, case)
    theirs.save_pretrained(tmp_path / "theirs")
    dt.save_adapter(_ours(base, adapters, case), tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    intended = _classifier_state(theirs)  # what PEFT's X-LoRA selects for its file
    assert {k: (tuple(v.shape), v.dtype) for k, v in ours.items()} == \
        {k: (tuple(v.shape), v.dtype) for k, v in intended.items()}
    their_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(our_cfg) == set(their_cfg)
    for key in ("adapters", "hidden_size", "peft_type", *CASES[case][2]):
        assert our_cfg[key] == their_cfg[key], key
    for name, path in adapters.items():  # each expert: a PEFT LoRA folder of the same keys and fields
        expert = load_file(tmp_path / "ours" / name / "adapter_model.safetensors")
        original = load_file(f"{path}/adapter_model.safetensors")
        assert {k: (tuple(v.shape), v.dtype) for k, v in expert.items()} == \
            {k: (tuple(v.shape), v.dtype) for k, v in original.items()}
        assert all(torch.equal(expert[k], original[k]) for k in expert)
        ours_cfg = json.loads((tmp_path / "ours" / name / "adapter_config.json").read_text())
        theirs_cfg = json.loads((tmp_path / "theirs" / name / "adapter_config.json").read_text())
        assert set(ours_cfg) == set(theirs_cfg)
