"""GGUF export's layout facts checked against independent code: transformers' GGUF reader undoes
the rotary permutation, transformers' Llama 3 rope matches the rope_freqs tensor, and bad
choices fail with messages that name the flag."""

from pathlib import Path

import gguf
import pytest
import torch
from transformers import GPT2Config, LlamaConfig, Qwen2Config
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from deltatune.export.gguf import _Encoder, check_outtype
from deltatune.export.gguf_arch import ARCHS, arch_for, gguf_name, permute_rows, rope_tensors, rotary_heads, \
    tensor_names, unpermute_rows


def _llama(**kw):
    return LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100, **kw)


@pytest.mark.parametrize("module, heads", [("model.layers.1.self_attn.q_proj", 4),
                                           ("model.layers.1.self_attn.k_proj", 2)])
def test_transformers_gguf_reader_undoes_the_rotary_permutation(module, heads):
    config = _llama()
    assert rotary_heads(config, arch_for(config), module) == heads
    rows = 64 if heads == 4 else 32  # k_proj has the key-value heads' rows only
    weight = torch.randn(rows, 64)
    permuted = permute_rows(weight, heads)
    assert not torch.equal(permuted, weight)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    name = "blk.1.attn_q.weight" if heads == 4 else "blk.1.attn_k.weight"
    restored = processor.process(weights=permuted.numpy(), name=name).weights
    assert torch.equal(torch.from_numpy(restored), weight)
    assert torch.equal(unpermute_rows(permuted, heads), weight)
    # a LoRA B (rows = outputs) and a bias are permuted alike
    for part in (weight[:, :3], weight[:, 0]):
        restored = processor.process(weights=permute_rows(part, heads).numpy(), name=name).weights
        assert torch.equal(torch.from_numpy(restored), part)


def test_only_llama_family_q_and_k_are_permuted():
    assert rotary_heads(_llama(), ARCHS["llama"], "model.layers.0.self_attn.v_proj") is None
    qwen = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    assert rotary_heads(qwen, arch_for(qwen), "model.layers.0.self_attn.q_proj") is None


def test_tensor_names_are_the_gguf_packages():
    config = _llama()
    names = tensor_names(config, arch_for(config))
    assert gguf_name(names, "model.layers.1.mlp.down_proj.weight") == "blk.1.ffn_down.weight"
    assert gguf_name(names, "model.embed_tokens.weight") == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    with pytest.raises(ValueError, match="no GGUF name"):
        gguf_name(names, "model.layers.0.mystery.weight")


def test_llama3_rope_factors_match_transformers():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = _llama(rope_parameters=rope, max_position_embeddings=131072)
    (name, factors), = rope_tensors(config, arch_for(config)).items()
    assert name == "rope_freqs.weight"
    dim = 16
    base = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    # llama.cpp divides each base frequency by its factor
    assert torch.allclose(base / factors, expected, rtol=1e-6)
    assert rope_tensors(_llama(), arch_for(_llama())) == {}


def test_unsupported_architectures_and_types_are_named():
    with pytest.raises(ValueError, match="'gpt2'.*convert_hf_to_gguf"):
        arch_for(GPT2Config())
    with pytest.raises(ValueError, match="--outtype 'q5_1'"):
        check_outtype("q5_1")
    with pytest.raises(ValueError, match="--outtype 'q4_0' is not supported for a GGUF adapter"):
        check_outtype("q4_0", "adapter")


def test_rows_that_are_not_whole_blocks_fall_back_to_f16():
    encoder = _Encoder("q8_0")
    data, qtype = encoder.encode("blk.0.attn_q.weight", torch.randn(8, 48))
    assert qtype == gguf.GGMLQuantizationType.F16 and data.dtype.name == "float16"
    encoder.encode("blk.1.attn_q.weight", torch.randn(8, 48))
    data, qtype = encoder.encode("blk.0.attn_k.weight", torch.randn(8, 64))
    assert qtype == gguf.GGMLQuantizationType.Q8_0
    _, qtype = encoder.encode("blk.0.attn_norm.weight", torch.randn(64))
    assert qtype == gguf.GGMLQuantizationType.F32
    assert encoder.types == {"F16": 2, "Q8_0": 1, "F32": 1}
    report = encoder.report(Path(__file__), "model")
    assert report.fallbacks == ["blk.0.attn_q.weight, blk.1.attn_q.weight: f16 (rows of 48 values are not whole "
                                "Q8_0 blocks of 32)"]
