"""The shape of a decoder for the planner: from a config.json, a GGUF file, the embedded default
or a named preset. Only sizes are read; no weights are loaded. Mixture-of-experts decoders
(Qwen3-MoE, Mixtral, OLMoE, gpt-oss) add their experts' sizes; ``plan_moe`` has their terms."""

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
    # mixture-of-experts: experts, top-k and the experts' width besides
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                          vocab_size=151936, tie_word_embeddings=False),
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         vocab_size=32000, tie_word_embeddings=False),
}

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_LINEARS = LINEARS[:4]
# Model types whose module names PEFT (and deltatune, targeting_experts.convert_former_moe_targets) reads
# on transformers 5 as the former per-expert linears: "all-linear" then reaches the fused experts and
# the router, and gate_proj/up_proj/down_proj name the experts' weights. A test checks this table
# against what deltatune does to tiny models.
FORMER_NAME_KINDS = {"qwen3_moe": "qwen2_moe", "olmoe": "qwen2_moe", "mixtral": "mixtral"}


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
    experts: int = 0  # routed experts per MoE layer; 0: a dense model
    top_k: int = 0  # experts each token is sent to
    expert_intermediate: int = 0  # one expert's gated-MLP width
    moe_layers: int = 0  # layers whose MLP is the experts (the others have the dense MLP of ``intermediate``)
    expert_bias: bool = False  # gpt-oss: biases on the experts' projections and on the router
    former_names: str = ""  # FORMER_NAME_KINDS' kind, or "" where module names keep their plain meaning

    @property
    def moe(self) -> bool:
        """Whether this is a mixture-of-experts decoder."""
        return self.experts > 0

    @property
    def dense_layers(self) -> int:
        """Layers with the dense gated MLP."""
        return self.layers - self.moe_layers

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
        """How many of a block's linear layers have each (in, out) shape (on an MoE model: the
        attention's, the dense MLP's where it has dense layers, and one expert's fused gate/up and down)."""
        ins, outs = self.linear_inputs(), self.linear_outputs()
        counts: dict[tuple[int, int], int] = {}
        names = LINEARS if not self.moe or self.dense_layers else ATTENTION_LINEARS
        for n in names:
            counts[(ins[n], outs[n])] = counts.get((ins[n], outs[n]), 0) + 1
        if self.moe:
            for key in ((self.hidden, 2 * self.expert_intermediate), (self.expert_intermediate, self.hidden)):
                counts[key] = counts.get(key, 0) + 1
        return counts

    def block_linear_parameters(self) -> int:
        """Weights of one dense block's linear layers (the ones 4-bit quantization stores packed)."""
        ins, outs = self.linear_inputs(), self.linear_outputs()
        return sum(ins[n] * outs[n] for n in LINEARS)

    def attention_parameters(self) -> int:
        """Weights of one block's attention projections."""
        ins, outs = self.linear_inputs(), self.linear_outputs()
        return sum(ins[n] * outs[n] for n in ATTENTION_LINEARS)

    def expert_parameters(self) -> int:
        """Weights of one MoE layer's experts: E fused gate/up (2I x H) and down (H x I) matrices."""
        return self.experts * 3 * self.expert_intermediate * self.hidden

    def quantized_parameters(self) -> int:
        """The weights 4-bit quantization stores packed: every linear of every block and, on an MoE
        model, every expert's fused weights (the router stays in full precision)."""
        if not self.moe:
            return self.layers * self.block_linear_parameters()
        mlp = self.block_linear_parameters() - self.attention_parameters()
        return self.layers * self.attention_parameters() + self.dense_layers * mlp \
            + self.moe_layers * self.expert_parameters()

    def active_parameters(self) -> int:
        """Weights of the blocks' matmuls that one token runs through: on an MoE layer its top-k
        experts and the router only."""
        if not self.moe:
            return self.layers * self.block_linear_parameters()
        mlp = self.block_linear_parameters() - self.attention_parameters()
        per_moe = self.top_k * 3 * self.expert_intermediate * self.hidden + self.experts * self.hidden
        return self.layers * self.attention_parameters() + self.dense_layers * mlp + self.moe_layers * per_moe

    def largest_block_parameters(self) -> int:
        """Linear (and expert) weights of the largest block: what FSDP2 gathers for one block."""
        if not self.moe:
            return self.block_linear_parameters()
        dense = self.block_linear_parameters() if self.dense_layers else 0
        return max(dense, self.attention_parameters() + self.expert_parameters())

    def other_parameters(self) -> int:
        """Embeddings, the output head when untied, norms, biases and routers: kept in full precision."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = (2 * self.layers + 1) * self.hidden
        outs = self.linear_outputs()
        bias = self.layers * (outs["q_proj"] + 2 * outs["k_proj"]) if self.attention_bias else 0
        if self.moe:  # routers (experts x hidden), gpt-oss's expert and router biases
            per_layer = self.experts * self.hidden
            if self.expert_bias:
                per_layer += self.experts * (1 + 2 * self.expert_intermediate + self.hidden)
            bias += self.moe_layers * per_layer
        return embeddings + norms + bias

    def parameters(self) -> int:
        """Every parameter of the base model."""
        return self.quantized_parameters() + self.other_parameters()


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
                      attention_bias=bool(config.get("attention_bias", False)), **_moe_fields(config, where))


# fields of MoE designs the planner does not count (shared experts, DeepSeek's routed-expert count)
_UNCOVERED_MOE_FIELDS = ("shared_expert_intermediate_size", "n_shared_experts", "n_routed_experts",
                         "num_shared_experts")


def _moe_fields(config: dict, where: str) -> dict:
    """``ModelShape``'s expert fields from a transformers config: Qwen3-MoE and OLMoE's
    ``num_experts``, Mixtral and gpt-oss's ``num_local_experts``; ``moe_intermediate_size`` where the
    experts are narrower than the dense MLP (Qwen3-MoE), else ``intermediate_size``; Qwen3-MoE's
    ``decoder_sparse_step`` and ``mlp_only_layers`` choose the MoE layers. Empty for a dense model."""
    kind = config.get("model_type", "?")
    uncovered = [k for k in _UNCOVERED_MOE_FIELDS if config.get(k)]
    if uncovered:
        raise ValueError(f"{where}: {', '.join(uncovered)}: the planner covers mixture-of-experts models without "
                         f"shared experts (Qwen3-MoE, Mixtral, OLMoE, gpt-oss); this config is model_type {kind}")
    experts = config.get("num_experts") or config.get("num_local_experts") or 0
    if not experts:
        return {}
    top_k = config.get("num_experts_per_tok") or config.get("experts_per_token")
    width = config.get("moe_intermediate_size") or config["intermediate_size"]
    bad = [n for n, v in (("num_experts_per_tok", top_k), ("moe_intermediate_size", width)) if not isinstance(v, int)]
    if bad or not isinstance(experts, int):
        raise ValueError(f"{where}: a mixture-of-experts config (model_type {kind}) needs integer "
                         f"{', '.join(bad) or 'num_experts'}")
    step = config.get("decoder_sparse_step") or 1
    dense_only = set(config.get("mlp_only_layers") or [])
    layers = config["num_hidden_layers"]
    moe_layers = sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
    return dict(experts=experts, top_k=top_k, expert_intermediate=width, moe_layers=moe_layers,
                expert_bias=kind == "gpt_oss", former_names=FORMER_NAME_KINDS.get(kind, ""))


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
