"""What ``deltatune bench`` measures: the cases (adapter settings), the model shapes and the batch.

Every tool gets the same model weights, the same batch and the same optimizer; only the
adapter implementation differs. The batch is the default job's training data packed into
full rows, with the loss on answers only, as instruction tuning trains (``labels="all"``
trains on every token instead).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .moe import MOE_SHAPES, moe_config


@dataclass(frozen=True)
class Case:
    """One row of the table: an adapter setting (or full fine-tuning) and checkpointing."""

    name: str
    method: str  # lora, dora or full
    dropout: float = 0.0
    bias: str = "none"
    checkpointing: bool = False
    offload: bool = False  # saved activations in pinned CPU memory (CUDA only)
    quantize: str = ""  # "nf4": the base's linear layers in NF4 with double quantization (QLoRA)
    recipe: bool = False  # PEFT side only: prepare_model_for_kbit_training (float32 non-quantized parameters)
    experts: bool = False  # MoE shapes: attention projections + fused expert weights (target_parameters)

    def to_dict(self) -> dict:
        return asdict(self)


def _both(name: str, method: str, **kw) -> list[Case]:
    return [Case(name, method, **kw), Case(f"{name}+checkpointing", method, checkpointing=True, **kw)]


CASES: dict[str, Case] = {c.name: c for c in [
    *_both("lora", "lora"),
    *_both("lora+dropout+bias", "lora", dropout=0.05, bias="lora_only"),
    *_both("dora", "dora"),
    Case("dora+dropout", "dora", dropout=0.05),
    Case("lora+offload", "lora", offload=True),
    Case("full", "full"),
    # 4-bit bases: deltatune's NF4 layers against transformers + bitsandbytes + PEFT. "+recipe" gives
    # PEFT its usual QLoRA recipe (prepare_model_for_kbit_training, with checkpointing); the
    # others leave it out, so the table separates what the recipe costs from what the kernels do.
    *[c for m in ("lora", "dora") for c in (
        *_both(f"q{m}", m, quantize="nf4"),
        Case(f"q{m}+recipe", m, checkpointing=True, quantize="nf4", recipe=True))],
    # mixture-of-experts shapes (moe.py): LoRA on the experts' fused 3-D weights beside attention
    *_both("moe-lora", "lora", experts=True),
]}

# Random-init shapes by name (Llama here, mixture-of-experts ones in moe.MOE_SHAPES); anything else
# is a Hugging Face config folder (or "default").
SHAPES = {
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                     max_position_embeddings=131072, tie_word_embeddings=True),
}


def load_base(shape: str, dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    """The base model of ``shape``: the embedded default model's weights for ``"default"``, a
    random initialisation (seeded) of a named shape or of a config folder otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if shape == "default":
        from ..loading import default_model_dir

        return AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=dtype,
                                                    attn_implementation="sdpa").to(device)
    if shape in SHAPES:
        config = LlamaConfig(**SHAPES[shape])
    elif shape in MOE_SHAPES:
        config = moe_config(shape)
    else:
        config = AutoConfig.from_pretrained(shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)


def quantized_folder(shape: str, model: torch.nn.Module, scratch: str) -> str:
    """A folder transformers can load ``model``'s weights from (bitsandbytes quantizes while loading)."""
    if shape == "default":
        from ..loading import default_model_dir

        return str(default_model_dir())
    model.save_pretrained(scratch)
    return scratch


def sft_batch(batch: int, seq_len: int, vocab_size: int, labels: str = "answers",
              device: str = "cpu") -> dict[str, torch.Tensor]:
    """``batch`` rows of ``seq_len`` tokens from the default job's training examples, packed end
    to end (repeated if there are too few); ids beyond ``vocab_size`` wrap around."""
    from transformers import AutoTokenizer

    from ..data import DataConfig, prepare_data
    from ..loading import default_model_dir
    from ..train.loop import DEFAULT_DATA

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    data = prepare_data(DataConfig(path=str(DEFAULT_DATA / "train.jsonl"), validation_fraction=0.0), tokenizer)
    ids: list[int] = []
    targets: list[int] = []
    while len(ids) < batch * seq_len:
        for example in data.train:
            ids += example.input_ids
            targets += example.labels
    need = batch * seq_len
    input_ids = torch.tensor(ids[:need]).remainder(vocab_size).view(batch, seq_len)
    label_ids = input_ids.clone() if labels == "all" else torch.tensor(targets[:need]).view(batch, seq_len)
    if labels == "answers":
        label_ids = torch.where(label_ids >= 0, label_ids.remainder(vocab_size), label_ids)
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "labels": label_ids.to(device)}


def labelled_share(batch: dict[str, torch.Tensor]) -> float:
    """Share of positions whose next-token label counts (what the loss trains on)."""
    return float((batch["labels"][:, 1:] != -100).float().mean())


def case_named(name: str) -> Optional[Case]:
    return CASES.get(name)
