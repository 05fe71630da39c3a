"""The shape of a decoder for the planner: from a config.json, a GGUF file, the embedded default
or a named preset. Only sizes are read; no weights are loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Shapes from the public model cards' config.json files (hidden, intermediate, layers, heads,
# key/value heads, vocabulary, tied embeddings).
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a Llama-style decoder (gated MLP, grouped-query attention)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool = False

    def linear_inputs(self) -> dict[str, int]:
        """Input width of each linear layer of a block."""
        q = self.heads * self.head_dim
        return {"q_proj": self.hidden, "k_proj": self.hidden, "v_proj": self.hidden, "o_proj": q,
                "gate_proj": self.hidden, "up_proj": self.hidden, "down_proj": self.intermediate}

    def linear_outputs(self) -> dict[str, int]:
        """Output width of each linear layer of a block."""
        kv = self.kv_heads * self.head_dim
        return {"q_proj": self.heads * self.head_dim, "k_proj": kv, "v_proj": kv, "o_proj": self.hidden,
                "gate_proj": self.intermediate, "up_proj": self.intermediate, "down_proj": self.hidden}

    def linear_shapes(self) -> dict[tuple[int, int], int]:
        """How many of a block's linear layers have each (in, out) shape."""
        ins, outs = self.linear_inputs(), self.linear_outputs()
        counts: dict[tuple[int, int], int] = {}
        for n in LINEARS:
            counts[(ins[n], outs[n])] = counts.get((ins[n], outs[n]), 0) + 1
        return counts

    def block_linear_parameters(self) -> int:
        """Weights of one block's linear layers (the ones 4-bit quantization stores packed)."""
        ins, outs = self.linear_inputs(), self.linear_outputs()
        return sum(ins[n] * outs[n] for n in LINEARS)

    def other_parameters(self) -> int:
        """Embeddings, the output head when untied, norms and biases: kept in full precision."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = (2 * self.layers + 1) * self.hidden
        outs = self.linear_outputs()
        bias = self.layers * (outs["q_proj"] + 2 * outs["k_proj"]) if self.attention_bias else 0
        return embeddings + norms + bias

    def parameters(self) -> int:
        """Every parameter of the base model."""
        return self.layers * self.block_linear_parameters() + self.other_parameters()


def shape_from_config(config: dict, name: str = "model", where: str = "config") -> ModelShape:
    """A ``ModelShape`` from a transformers config dictionary (Llama, Mistral, Qwen2/3, Gemma, Phi-3
    field names); a missing field is an error naming ``where``."""
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in needed if not isinstance(config.get(k), int)]
    if missing:
        kind = config.get("model_type", "?")
        raise ValueError(f"{where}: the planner needs {', '.join(missing)} (a Llama-style decoder); "
                         f"this config (model_type {kind}) has none")
    heads = config["num_attention_heads"]
    return ModelShape(name=name, hidden=config["hidden_size"], intermediate=config["intermediate_size"],
                      layers=config["num_hidden_layers"], heads=heads,
                      kv_heads=config.get("num_key_value_heads") or heads,
                      head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                      vocab=config["vocab_size"], tied=bool(config.get("tie_word_embeddings", False)),
                      attention_bias=bool(config.get("attention_bias", False)))


def load_shape(model: Optional[str]) -> ModelShape:
    """The shape of ``model``: a preset name, a model folder, a config.json, a .gguf file, or
    empty/None for the embedded default (its config is read from the cached conversion)."""
    if not model:
        from ..loading import DEFAULT_NAME, default_model_dir

        path = default_model_dir() / "config.json"
        return shape_from_config(json.loads(path.read_text()), DEFAULT_NAME, str(path))
    if model.lower() in PRESETS:
        return shape_from_config(PRESETS[model.lower()], model.lower(), model)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
        return shape_from_config(config, path.stem, str(path))
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--model: {model!r} is not a preset ({', '.join(PRESETS)}), a model folder with "
                                "config.json, a config.json or a .gguf file")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--model: {path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--model: {path} does not hold a mapping of config fields")
    return shape_from_config(config, path.parent.name, str(path))


def tokenizer_folder(model: Optional[str]) -> Optional[str]:
    """The folder whose tokenizer a training run of ``model`` loads (None for a preset)."""
    if not model:
        from ..loading import default_model_dir

        return str(default_model_dir())
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    return str(path.parent) if path.is_file() and path.name == "config.json" else None
