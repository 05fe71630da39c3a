"""How llama.cpp names and lays out a Hugging Face architecture: the GGUF architecture, tensor
names, the rotary permutation of Q and K, and the hyperparameter keys.

Facts follow llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel``, ``Qwen2Model``,
``TextModel.set_gguf_parameters``); key and tensor names come from the ``gguf`` package's
constants, never spelled here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import gguf
import torch


@dataclass(frozen=True)
class GgufArch:
    """A supported architecture as llama.cpp's converter writes it."""

    arch: gguf.MODEL_ARCH
    # llama.cpp's Llama graph applies rotary embeddings to interleaved pairs, Hugging Face's to
    # the two halves of each head, so the converter reorders the rows of Q and K (``permute``).
    permute_qk: bool
    # llama.cpp's LlamaModel also writes the vocabulary size and the rotary width.
    llama_keys: bool

    @property
    def name(self) -> str:
        """The value of ``general.architecture`` (``"llama"``, ``"qwen2"``)."""
        return gguf.MODEL_ARCH_NAMES[self.arch]


# Hugging Face model_type -> how llama.cpp converts it (MistralForCausalLM is a LlamaModel there).
ARCHS = {
    "llama": GgufArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, llama_keys=True),
    "mistral": GgufArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, llama_keys=True),
    "qwen2": GgufArch(gguf.MODEL_ARCH.QWEN2, permute_qk=False, llama_keys=False),
}


def arch_for(config) -> GgufArch:
    """The GGUF layout of a model with this config; a ValueError names what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(f"GGUF export supports the architectures {sorted(ARCHS)} (Llama family: SmolLM, "
                         f"Llama 2/3, Mistral; Qwen2); this base is {model_type!r}. Merge with `deltatune merge` "
                         "and convert the folder with llama.cpp's convert_hf_to_gguf.py instead")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("GGUF export writes decoder-only models only")
    return ARCHS[model_type]


def tensor_names(config, arch: GgufArch) -> gguf.TensorNameMap:
    """The ``gguf`` package's Hugging Face -> GGUF tensor-name map for this model."""
    return gguf.get_tensor_name_map(arch.arch, config.num_hidden_layers)


def gguf_name(names: gguf.TensorNameMap, hf_key: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``; a ValueError for a
    tensor llama.cpp has no place for (it would be dropped silently otherwise)."""
    module, _, suffix = hf_key.rpartition(".")
    if suffix not in ("weight", "bias"):
        module, suffix = hf_key, ""
    name = names.get_name(module)
    if name is None:
        raise ValueError(f"tensor {hf_key!r} has no GGUF name in llama.cpp's layout for this architecture")
    return f"{name}.{suffix}" if suffix else name


def rotary_heads(config, arch: GgufArch, module: str) -> Optional[int]:
    """Heads to permute the rows of module ``module``'s outputs over (``...self_attn.q_proj``: the
    attention heads; ``k_proj``: the key-value heads), or None where nothing is permuted."""
    if not arch.permute_qk:
        return None
    leaf = module.rsplit(".", 1)[-1]
    if leaf == "q_proj":
        return config.num_attention_heads
    if leaf == "k_proj":
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def permute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: within each head, rows ``[h0 h1 | h2 h3]`` (halves) become
    ``[h0 h2 h1 h3]`` (pairs). Works on a weight, a bias, or a LoRA B (rows = output features)."""
    out = rows.shape[0]
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def unpermute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``permute_rows`` (what a GGUF reader such as transformers applies)."""
    out = rows.shape[0]
    return rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _rope(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hyperparameters(writer: gguf.GGUFWriter, config, arch: GgufArch) -> None:
    """The ``{arch}.*`` keys llama.cpp's converter writes for this model."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if getattr(config, "head_dim", None) is not None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if arch.llama_keys:
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim(config))
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "llama3" and arch.llama_keys:
        pass  # written as the rope_freqs tensor (rope_tensors)
    elif kind != "default":
        raise ValueError(f"rotary scaling {kind!r} is not supported by deltatune's GGUF export (default, linear "
                         "and llama3 are); convert a merged folder with llama.cpp's convert_hf_to_gguf.py")


def rope_tensors(config, arch: GgufArch) -> dict[str, torch.Tensor]:
    """Extra tensors llama.cpp needs: Llama 3's rotary frequency factors (``rope_freqs.weight``),
    each a divisor of the base frequency, as llama.cpp's ``generate_extra_tensors`` computes them."""
    rope = _rope(config)
    if rope["rope_type"] != "llama3" or not arch.llama_keys:
        return {}
    dim = head_dim(config)
    freqs = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return {name: torch.tensor(factors, dtype=torch.float32)}
