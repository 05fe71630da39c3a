"""The training loss on labelled positions only equals the model's own loss, value and gradients;
the fused cross-entropy equals ``F.linear`` + ``F.cross_entropy``."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

import deltatune as dt
from deltatune.kernels import cross_entropy
from deltatune.kernels.cross_entropy import linear_cross_entropy
from deltatune.loss import LABELLED_ONLY_CLASSES, TrainingLoss
from tiny_models import VOCAB, randomize_adapter, sample_ids, tiny_model
from tiny_moe import EXPERT_TARGETS, MOE_ARCHS, tiny_moe


@pytest.mark.parametrize("chunk_elements", [1 << 25, 3 * 50])  # one chunk; chunks of 3 rows
@pytest.mark.parametrize("bias,train_head", [(False, False), (True, True)])
def test_linear_cross_entropy_matches_composed_ops(monkeypatch, chunk_elements, bias, train_head):
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=train_head)
    b = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=train_head) if bias else None
    targets = torch.randint(0, 50, (10,), generator=g)
    fused = linear_cross_entropy(hidden, weight, b, targets)
    plain = F.cross_entropy(F.linear(hidden, weight, b), targets)
    torch.testing.assert_close(fused.double(), plain, rtol=1e-6, atol=1e-6)  # float32 reduction
    wrt = [t for t in (hidden, weight, b) if t is not None and t.requires_grad]
    for got, want in zip(torch.autograd.grad(fused * 3, wrt), torch.autograd.grad(plain * 3, wrt)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # float32 softmax


def test_no_labelled_rows_gives_nan_like_cross_entropy():
    empty = torch.zeros(0, 8)
    assert torch.isnan(linear_cross_entropy(empty, torch.randn(5, 8), None, torch.zeros(0, dtype=torch.long)))


def _tiny(arch):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    extra = {"mistral": (MistralForCausalLM, MistralConfig), "qwen3": (Qwen3ForCausalLM, Qwen3Config),
             "phi3": (Phi3ForCausalLM, Phi3Config)}
    if arch in MOE_ARCHS:
        return tiny_moe(arch)
    if arch in extra:
        cls, config_cls = extra[arch]
        torch.manual_seed(0)
        return cls(config_cls(**common))
    return tiny_model(arch)


def _batch():
    ids = sample_ids(batch=3, length=9)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[2, 7:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mistral", "qwen3", "phi3", *MOE_ARCHS])
def test_labelled_positions_loss_equals_the_models_own(arch):
    model = _tiny(arch)
    assert type(model).__name__ in LABELLED_ONLY_CLASSES
    experts = dict(target_parameters=EXPERT_TARGETS) if arch in MOE_ARCHS else {}
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules="all-linear" if not experts else ["q_proj"],
                                        **experts))
    randomize_adapter(model)
    model.train()
    batch = _batch()
    loss_module = TrainingLoss(model)
    assert loss_module.reason is None and "fused" in loss_module.describe()
    params = [p for p in model.parameters() if p.requires_grad]
    fast = loss_module(batch)
    fast_grads = torch.autograd.grad(fast, params)
    own = model(**batch, use_cache=False).loss
    own_grads = torch.autograd.grad(own, params)
    torch.testing.assert_close(fast, own, rtol=1e-5, atol=1e-6)
    for got, want in zip(fast_grads, own_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_adapted_head_and_unchecked_models_and_hooks():
    model = tiny_model("llama")
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    loss_module = TrainingLoss(model)
    assert "adapted head" in loss_module.describe()
    torch.testing.assert_close(loss_module(_batch()), model(**_batch()).loss)

    gemma = tiny_model("gemma")
    assert "GemmaForCausalLM is not among" in TrainingLoss(gemma).describe()
    torch.testing.assert_close(TrainingLoss(gemma)(_batch()), gemma(**_batch()).loss)

    balanced = tiny_moe("mixtral")
    balanced.config.output_router_logits = True  # the model's forward adds the routers' loss
    assert "load-balancing loss" in TrainingLoss(balanced).describe()
    torch.testing.assert_close(TrainingLoss(balanced)(_batch()), balanced(**_batch()).loss)

    prompted = tiny_model("llama")
    dt.add_adapter(prompted, dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert "hooks" in TrainingLoss(prompted).describe()


def test_evaluation_without_gradients_gives_the_same_loss():
    model = tiny_model("llama")
    dt.add_adapter(model, dt.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapter(model)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(TrainingLoss(model)(_batch()), model(**_batch()).loss)
