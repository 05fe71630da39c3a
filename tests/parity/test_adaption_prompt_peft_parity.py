"""Adaption prompts (LLaMA-Adapter) against PEFT: files loaded both ways give the same logits, the
files carry PEFT's keys, shapes, dtypes and config fields, one backward step gives PEFT's
gradients, seeded initialisation draws PEFT's values, and ``generate`` with the KV cache gives
the greedy tokens of full forward passes (and PEFT's)."""

import copy

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from peft_roundtrip import assert_same_files, deltatune_file_to_peft, peft_file_to_deltatune
from tiny_models import eval_logits, randomize_adapter, sample_ids, tiny_model

peft = pytest.importorskip("peft")

ATOL = 1e-5

# case -> (architecture, config fields); PEFT 0.21.2 supports llama, mistral and gpt2
CASES = {
    "llama-top-layer": ("llama", dict(adapter_len=3, adapter_layers=1)),
    "llama-all-layers": ("llama", dict(adapter_len=5, adapter_layers=2)),
    "mistral": ("mistral", dict(adapter_len=4, adapter_layers=2)),
    "gpt2": ("gpt2", dict(adapter_len=3, adapter_layers=2)),
}


def _base(arch):
    if arch != "mistral":
        return tiny_model(arch)
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval()


def _open_gates(model, seed):
    """Random values everywhere, and gates big enough that the prompts change the logits clearly
    (a zero-initialised gate plus a little noise would leave them almost unchanged)."""
    randomize_adapter(model, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaption_gate" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def _peft_name(name):
    """deltatune's parameter name as PEFT names it (without the holder module and adapter name)."""
    return name.replace(".deltatune_adaption", "").replace(".default", "")


def _peft(base, case):
    model = peft.get_peft_model(copy.deepcopy(base), peft.AdaptionPromptConfig(task_type="CAUSAL_LM",
                                                                               **CASES[case][1]))
    _open_gates(model, seed=2)
    return model


def _ours(base, case):
    model = dt.add_adapter(copy.deepcopy(base), dt.AdaptionPromptConfig(task_type="CAUSAL_LM", **CASES[case][1]))
    _open_gates(model, seed=5)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_deltatune_loads(case, tmp_path, parity_results):
    base = _base(CASES[case][0])
    diff = parity_results[f"adaption-prompt-{case}: PEFT file -> deltatune"] = \
        peft_file_to_deltatune(base, _peft(base, case), tmp_path)  # the prompts really change the output
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_saves_peft_loads(case, tmp_path, parity_results):
    base = _base(CASES[case][0])
    diff = parity_results[f"adaption-prompt-{case}: deltatune file -> PEFT"] = \
        deltatune_file_to_peft(base, _ours(base, case), tmp_path)
    assert diff <= ATOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_match_peft(case, tmp_path):
    base = _base(CASES[case][0])
    ours, _ = assert_same_files(_peft(base, case), _ours(base, case), tmp_path,
                                ("target_modules", "adapter_len", "adapter_layers", "peft_type", "task_type",
                                 "inference_mode"), unordered_lists=False)
    assert len(ours) == 2 * CASES[case][1]["adapter_layers"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_of_one_step_equal_peft(case, tmp_path):
    base, ids = _base(CASES[case][0]), sample_ids()
    theirs = _peft(base, case)
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path, trainable=True)
    for model in (theirs, ours):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    their_grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {_peft_name(n): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(our_grads) == set(their_grads)
    for name, grad in our_grads.items():
        assert grad is not None and grad.abs().max() > 0, name
        torch.testing.assert_close(grad, their_grads[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", ["llama-all-layers", "gpt2"])
def test_seeded_initialisation_draws_peft_values(case):
    base = _base(CASES[case][0])
    torch.manual_seed(11)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaptionPromptConfig(**CASES[case][1]))
    torch.manual_seed(11)
    ours = dt.add_adapter(copy.deepcopy(base), dt.AdaptionPromptConfig(**CASES[case][1]))
    their_values = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters() if p.requires_grad}
    our_values = {_peft_name(n): p for n, p in ours.named_parameters() if p.requires_grad}
    assert set(our_values) == set(their_values)
    for name, value in our_values.items():
        assert torch.equal(value, their_values[name]), name
    ids = sample_ids()
    assert torch.equal(eval_logits(ours, ids), eval_logits(base, ids))  # zero gates: a new adapter changes nothing


def _full_pass_tokens(model, out, prompt_length):
    with torch.no_grad():
        logits = model(out).logits
    return logits.argmax(-1)[:, prompt_length - 1:-1]


@pytest.mark.parametrize("case", ["llama-all-layers", "gpt2"])
def test_generate_with_kv_cache(case, tmp_path):
    base, ids = _base(CASES[case][0]), sample_ids()
    theirs = _peft(base, case)
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path).eval()
    theirs.eval()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        peft_out = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(out[:, ids.shape[1]:], _full_pass_tokens(ours, out, ids.shape[1]))
    assert torch.equal(out, peft_out)
    with dt.disable_adapters(ours), torch.no_grad():
        plain = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        expected = base.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(plain, expected)


def test_two_peft_files_switch_like_peft(tmp_path):
    """Two adapters on one model (PEFT keeps one active at a time; so does this test)."""
    base, ids = _base("llama"), sample_ids()
    first, second = _peft(base, "llama-top-layer"), _peft(base, "llama-all-layers")
    _open_gates(second, seed=9)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "a", name="a")
    dt.load_adapter(ours, tmp_path / "b", name="b")
    for name, theirs in (("a", first), ("b", second)):
        dt.set_adapter(ours, name)
        assert (eval_logits(ours, ids) - eval_logits(theirs, ids)).abs().max() <= ATOL


def test_unsupported_architecture_and_missing_length_say_so():
    with pytest.raises(ValueError, match="model_type 'qwen2' is not supported"):
        dt.add_adapter(tiny_model("qwen2"), dt.AdaptionPromptConfig(adapter_len=4))
    with pytest.raises(ValueError, match="adapter_len is required"):
        dt.add_adapter(tiny_model("llama"), dt.AdaptionPromptConfig())
    with pytest.raises(ValueError, match="adapter_layers=3 but"):
        dt.add_adapter(tiny_model("llama"), dt.AdaptionPromptConfig(adapter_len=4, adapter_layers=3))
    with pytest.raises(ValueError, match="adapter_len must be a positive integer"):
        dt.AdaptionPromptConfig(adapter_len=0)


@pytest.mark.parametrize("lora_first", [True, False])
def test_lora_on_the_same_attention_in_either_order(lora_first, tmp_path):
    """The attention module is not replaced: a LoRA on its projections finds them before or after
    the prompts are added, its file keys stay PEFT's, and PEFT's own two adapters (loaded one at
    a time) give the two outputs deltatune gives with each one active."""
    base, ids = _base("llama"), sample_ids()
    ours = copy.deepcopy(base)
    configs = [("lora", dt.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False)),
               ("prompts", dt.AdaptionPromptConfig(adapter_len=3, adapter_layers=2))]
    for name, config in (configs if lora_first else configs[::-1]):
        dt.add_adapter(ours, config, name)
    _open_gates(ours, seed=3)
    assert sum(1 for n, _ in ours.named_modules() if n.endswith("q_proj") and "lora_A" not in n) == 2
    for name in ("lora", "prompts"):
        dt.save_adapter(ours, tmp_path / name, name=name)
        keys = load_file(tmp_path / name / "adapter_model.safetensors").keys()
        assert all(".base_layer." not in k and "deltatune" not in k for k in keys)
        dt.set_adapter(ours, name)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name)
        assert (eval_logits(ours, ids) - eval_logits(theirs, ids)).abs().max() <= ATOL
    dt.set_adapter(ours, ["lora", "prompts"])  # both at once: the prompts see the LoRA'd projections
    both = eval_logits(ours, ids)
    assert (both - eval_logits(base, ids)).abs().max() > 1e-2
    dt.delete_adapter(ours, "prompts")
    dt.delete_adapter(ours, "lora")
    assert torch.equal(eval_logits(ours, ids), eval_logits(base, ids))
    assert {n for n, _ in ours.named_parameters()} == {n for n, _ in base.named_parameters()}
