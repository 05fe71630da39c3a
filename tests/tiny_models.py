"""Tiny random models built from configs, so tests run in seconds on several architectures."""

from __future__ import annotations

import torch
from transformers import (
    GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
    Qwen2Config, Qwen2ForCausalLM, T5Config, T5ForConditionalGeneration,
)

VOCAB = 128


def _config(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return LlamaForCausalLM, LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2ForCausalLM, Qwen2Config(**common)
    if arch == "gemma":
        return GemmaForCausalLM, GemmaConfig(**common, head_dim=8)
    if arch == "gpt2":
        return GPT2LMHeadModel, GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0)
    if arch == "t5":
        return T5ForConditionalGeneration, T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                    num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                                    pad_token_id=0, eos_token_id=2, dropout_rate=0.0)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A fresh tiny model of ``arch``; the same seed gives the same weights."""
    cls, config = _config(arch)
    torch.manual_seed(seed)
    model = cls(config).eval()
    # Random biases, so that bias handling (GPT-2, Qwen2 q/k/v) is really exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


def sample_ids(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def eval_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits in eval mode without gradients; an encoder-decoder's decoder reads the same ids."""
    model.eval()
    with torch.no_grad():
        if model.config.is_encoder_decoder:  # T5: the decoder reads the same ids, shifted by the model
            return model(input_ids=ids, labels=ids).logits
        return model(ids).logits


def randomize_adapter(model: torch.nn.Module, seed: int = 2) -> None:
    """Give every trainable tensor random values, so parity checks compare non-trivial adapters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=g) * 0.1).to(p.device, p.dtype))


def tiny_llama_64(seed: int = 0) -> torch.nn.Module:
    """A tiny Llama whose widths (64, 128) are multiples of the 4-bit block size.

    bitsandbytes' CPU dequantization kernel is only right when a row's length is a multiple of
    the block size, so quantization parity tests use this model.
    """
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2_64(seed: int = 0) -> torch.nn.Module:
    """A tiny GPT-2 (``Conv1D`` layers) with block-aligned widths and no dropout."""
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                        eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def saved_tiny_llama_64(folder, seed: int = 0, arch: str = "llama"):
    """Save ``tiny_llama_64`` (or ``tiny_gpt2_64`` with ``arch="gpt2"``) as a Hugging Face folder."""
    (tiny_gpt2_64(seed) if arch == "gpt2" else tiny_llama_64(seed)).save_pretrained(folder)
    return folder


def tiny_chat_model_dir(folder, tokenizer, seed: int = 0):
    """A tiny random Llama sized to ``tokenizer``'s vocabulary, saved with the tokenizer."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_t5_dir(folder, tokenizer, seed: int = 0):
    """A tiny random T5 (encoder-decoder) sized to ``tokenizer``, saved with the tokenizer."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, decoder_start_token_id=pad, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def word_meaning_data(path, count: int):
    """A prompt/completion JSONL file of ``count`` records whose answers follow a pattern."""
    import json

    path.write_text("".join(json.dumps({"prompt": f"Word {i}:", "completion": f" meaning {i % 5}"}) + "\n"
                            for i in range(count)))
    return path
