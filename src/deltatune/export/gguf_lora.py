"""A PEFT LoRA adapter as the tensors of a GGUF LoRA adapter, in the layout llama.cpp reads.

llama.cpp's ``convert_lora_to_gguf.py`` writes, for each adapted base tensor ``<name>.weight``,
``<name>.weight.lora_a`` (A, rank x in) and ``<name>.weight.lora_b`` (B, out x rank), and one
``adapter.lora.alpha``; llama.cpp adds ``(alpha / rank) · B (A x)`` with the rank read from B.
Q and K rows are reordered for llama.cpp's rotary layout, so B's rows are permuted as the base
weight's are (A is untouched). An embedding's A is stored transposed (vocab x rank), as
llama.cpp's embedding lookup reads rows of it (on bases whose output head is a separate tensor:
where the head is tied to the embedding, llama.cpp has one tensor for both, so an adapter on
either is refused).

A file holds a single alpha, where PEFT allows one per module (``alpha_pattern``) and rsLoRA
scales by alpha / √rank: such differences are folded into B, so every module's update is exact.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Union

import torch

from ..config import LoraConfig
from ..io import read_adapter_config, read_weights, weights_file
from ..targeting import pattern_value
from .gguf_arch import GgufArch, gguf_name, permute_rows, rotary_heads, tensor_names

FILE_PREFIX = "base_model.model."
_FACTORS = {".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
            ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True)}


def read_plain_lora(folder: Union[str, os.PathLike]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of a plain LoRA adapter folder; anything llama.cpp's LoRA adapters
    cannot express (DoRA, biases, full module copies, other methods) is a ValueError."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    advice = "write the merged model instead (--gguf-kind merged), which works for every mergeable method"
    if config.peft_type != "LORA" or type(config) is not LoraConfig:
        hint = " (cut it to one rank first: deltatune export --rank N)" if config.peft_type == "DYLORA" else ""
        raise ValueError(f"{folder}: a GGUF LoRA adapter holds plain LoRA only, this adapter is "
                         f"{config.peft_type}{hint}; {advice}")
    refused = [(config.use_dora, "use_dora (DoRA)"), (config.bias != "none", f"bias={config.bias!r}"),
               (config.lora_bias, "lora_bias"), (bool(config.modules_to_save), "modules_to_save"),
               (config.fan_in_fan_out, "fan_in_fan_out"),
               (bool(config.target_parameters), "target_parameters (LoRA on fused expert weights)")]
    for present, what in refused:
        if present:
            raise ValueError(f"{folder}: llama.cpp's LoRA adapters cannot express {what}; {advice}")
    return config, read_weights(weights_file(folder))


def _pairs(tensors: dict[str, torch.Tensor], weights: str) -> dict[str, dict]:
    """module name -> {"A": tensor, "B": tensor, "embedding": bool}."""
    pairs: dict[str, dict] = {}
    for key, value in tensors.items():
        if key.endswith(".base_layer.weight"):
            continue  # PEFT saves a targeted embedding's base weights too; the base file has them
        factor = next((suffix for suffix in _FACTORS if key.endswith(suffix)), None)
        if factor is None or not key.startswith(FILE_PREFIX):
            raise ValueError(f"{weights}: key {key!r} is not a LoRA factor (lora_A/lora_B); a GGUF LoRA adapter "
                             "holds nothing else")
        which, embedding = _FACTORS[factor]
        module = key[len(FILE_PREFIX):-len(factor)]
        pairs.setdefault(module, {"embedding": embedding})[which] = value.float()
    for module, pair in pairs.items():
        if "A" not in pair or "B" not in pair:
            raise ValueError(f"{weights}: module {module!r} has lora_{'B' if 'A' in pair else 'A'} missing")
    return pairs


def lora_gguf_tensors(folder: Union[str, os.PathLike], model_config,
                      arch: GgufArch) -> tuple[float, dict[str, torch.Tensor]]:
    """``(alpha, {gguf tensor name: float32 tensor})`` for the adapter in ``folder`` on a base whose
    config is ``model_config``, in llama.cpp's layout."""
    config, tensors = read_plain_lora(folder)
    weights = str(Path(folder) / "adapter_model.safetensors")
    pairs = _pairs(tensors, weights)
    # the single alpha: the config's own, as llama.cpp's converter writes it (rsLoRA: its alpha
    # for the config's rank, so a module at that rank keeps B as stored)
    alpha = config.lora_alpha * (math.sqrt(config.r) if config.use_rslora else 1.0)
    if alpha == 0:
        raise ValueError(f"{folder}: lora_alpha is 0, so the adapter changes nothing (and llama.cpp reads alpha 0 "
                         "as 'scale 1')")
    names = tensor_names(model_config, arch)
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    for module, pair in sorted(pairs.items()):
        A, B = pair["A"], pair["B"]
        rank = A.shape[0]
        if B.shape[1] != rank:
            raise ValueError(f"{weights}: {module}: lora_A has rank {rank}, lora_B has {B.shape[1]}")
        try:
            base = gguf_name(names, module + ".weight")
        except ValueError:
            raise ValueError(f"{weights}: module {module!r} has no tensor in llama.cpp's {arch.name} model") from None
        if tied and (base.startswith("output.") or pair["embedding"]):
            # llama.cpp's output head is then the token_embd tensor itself, so an adapter on either
            # would reach both, where in PyTorch it changes one of them
            raise ValueError(f"{weights}: the adapter changes {module}, which this base ties to the "
                             f"{'token embedding' if base.startswith('output.') else 'output head'}; llama.cpp "
                             "keeps one tensor for both and cannot adapt one alone: write the merged model instead")
        module_alpha = pattern_value(config.alpha_pattern, module, config.lora_alpha)
        # PEFT's scale is module_alpha / rank (/ √rank for rsLoRA); llama.cpp's is alpha / rank
        effective = module_alpha * (math.sqrt(rank) if config.use_rslora else 1.0)
        if effective != alpha:
            B = B * (effective / alpha)
        if pair["embedding"]:
            out[base + ".lora_a"] = A.T.contiguous()  # rows looked up by token id
            out[base + ".lora_b"] = B
            continue
        heads = rotary_heads(model_config, arch, module)
        out[base + ".lora_a"] = A
        out[base + ".lora_b"] = permute_rows(B, heads) if heads else B
    return float(alpha), out
